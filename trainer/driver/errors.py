"""Turns failures from deep inside Ray or DeepSpeed into one line for the user."""

from __future__ import annotations

from typing import Optional


def root_cause(e: BaseException) -> BaseException:
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or getattr(e, "cause", None)
        if isinstance(nxt, BaseException):
            e = nxt
            continue
        # Ray Train V2 keeps per-worker errors in a dict.
        workers = getattr(e, "worker_failures", None) or getattr(e, "_worker_failures", None)
        if isinstance(workers, dict) and workers:
            e = next(iter(workers.values()))
            continue
        break
    return e


def explain(e: BaseException) -> str:
    cause = root_cause(e)
    lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    msg = lines[-1] if lines else ""
    return f"{type(cause).__name__}: {msg}" if msg else type(cause).__name__


def below(e: BaseException, run_uri: str) -> Optional[str]:
    """One line for a failure of the disk or the object store under a run (a full disk, a lost
    permission, a read-only remount, a vanished directory, a store failing through the retry
    budget: data_pipeline/failures.py), with what is safe; None for anything else."""
    from data_pipeline.failures import describe

    safe = (
        f"the checkpoints registered in {run_uri}/checkpoints.json are whole (a checkpoint being "
        "written is registered only once all its files are in place, so a half-written one is "
        "never resumed from); the same command resumes from the latest"
    )
    return describe(e, safe=safe, where=run_uri)
