"""Turns failures from deep inside Ray or DeepSpeed into one line for the user."""

from __future__ import annotations


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
