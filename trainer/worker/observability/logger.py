"""Rank-0 run logging: metrics.jsonl, eval.jsonl, summary.json, W&B and console lines."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from trainer.config import LoggingConfig


def wandb_key(key: str) -> str:
    """The W&B name of a metrics.jsonl key: step-time breakdown under time/ (data_time_s ->
    time/data_s), memory under memory/, everything else under train/."""
    if key.endswith("_time_s"):
        return f"time/{key[: -len('_time_s')]}_s"
    if key.endswith("_mib"):
        return f"memory/{key}"
    return f"train/{key}"


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLogger:
    """Writes one JSON object per logged step; mirrors to W&B (offline unless configured)."""

    def __init__(
        self,
        run_dir: Path,
        logging: LoggingConfig,
        *,
        run_name: str,
        group: Optional[str],
        wandb_id: str,
        config: dict,
        max_steps: int,
        start_step: int,
        console_lines: bool = True,
        fork_from: Optional[str] = None,
    ):
        """fork_from: "<W&B id>?_step=<s>" when this invocation resumes at step s a run that
        logged later steps (set aside in the run files): W&B then gets a new run, `wandb_id`,
        forked from that one at s (W&B's fork_from: the old run's history up to s, then this
        invocation's rows), so one W&B run holds each step once and the old one stays as it
        was, like the set-aside rows. W&B's rewind of a run in place (resume_from) is in private
        preview and its docs recommend forking. Where the W&B server refuses the fork (forking
        is in preview on some deployments), the new run starts without the old history (one
        warning line; its config names the run it continues, `resumed_from`)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.max_steps, self.start_step = max_steps, start_step
        self.console_lines = console_lines
        self._t0 = time.perf_counter()
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._eval = open(self.run_dir / "eval.jsonl", "a", buffering=1)
        # For the summary, over this invocation's rows: the first row's step times (warm-up),
        # running sums and counts of the later rows' step times, memory maxima.
        self._first_times: Optional[dict[str, float]] = None
        self._time_sums: dict[str, list[float]] = {}
        self._memory_max: dict[str, float] = {}
        self.wandb = None
        if logging.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            init = dict(
                project=logging.project,
                entity=logging.entity,
                group=group or logging.group,
                name=run_name,
                id=wandb_id,
                mode=logging.mode,
                dir=str(self.run_dir),
                tags=list(logging.tags),
                config=config,
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
            if fork_from is None:
                self.wandb = wandb.init(**init, resume="allow")
            else:
                try:
                    self.wandb = wandb.init(**init, fork_from=fork_from)
                except Exception as e:  # noqa: BLE001 - the server's refusal, in any form
                    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    print(
                        f"warning: W&B refused to fork run {fork_from} ({reason}): logging to "
                        f"a new W&B run {wandb_id} (config resumed_from) without its history",
                        file=sys.stderr,
                        flush=True,
                    )
                    init["config"] = {**config, "resumed_from": fork_from}
                    self.wandb = wandb.init(**init)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._aggregate(row)
        if self.wandb is not None:
            # W&B stamps each row's wall clock itself (_timestamp)
            self.wandb.log(
                {wandb_key(k): v for k, v in row.items() if k not in ("step", "time")}, step=step
            )
        self._console(step, {"step": step, **metrics})

    def log_eval(
        self,
        step: int,
        val_loss: float,
        by_source: Optional[dict[str, float]] = None,
        *,
        val_bpb: Optional[float] = None,
        bpb_by_source: Optional[dict[str, float]] = None,
    ) -> None:
        """One eval.jsonl row; with a mixture (by_source: each source's val loss, val_loss
        their mean) also val_loss/<source> (W&B: val/loss/<source>). val_bpb: bits per byte
        of raw text (val_bpb/<source> from bpb_by_source; W&B val/bpb, val/bpb/<source>),
        left out when None (trainer/worker/observability/bpb.py)."""
        row = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        sources = {f"val_loss/{name}": loss for name, loss in (by_source or {}).items()}
        row.update(sources)
        if val_bpb is not None:
            row["val_bpb"] = val_bpb
        row.update({f"val_bpb/{name}": v for name, v in (bpb_by_source or {}).items()})
        self._eval.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            named = {f"val/{k.replace('val_', '', 1)}": v for k, v in row.items() if "/" in k}
            bpb = {"val/bpb": val_bpb} if val_bpb is not None else {}
            self.wandb.log(
                {"val/loss": row["val_loss"], "val/ppl": row["val_ppl"], **bpb, **named},
                step=step,
            )
        each = "".join(f"  {k} {v:.4f}" for k, v in sources.items())
        bits = f"  val_bpb {val_bpb:.4f}" if val_bpb is not None else ""
        print(
            f"[eval] step {step:>6}  val_loss {val_loss:.4f}  val_ppl {row['val_ppl']:.2f}"
            f"{bits}{each}"
        )
        sys.stdout.flush()

    def _console(self, step: int, row: dict[str, Any]) -> None:
        if not self.console_lines:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(done, 1) * (self.max_steps - step)
        print(
            f"step {step:>6}/{self.max_steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"{row['tokens_per_sec']:,.0f} train tok/s  mfu {100 * row['mfu']:.1f}%  "
            f"eta {_hms(eta)}"
        )
        sys.stdout.flush()

    def _aggregate(self, row: dict[str, Any]) -> None:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        for k in ("peak_rss_mib", "cuda_peak_mib", "cuda_reserved_mib"):
            if k in numbers:
                self._memory_max[k] = max(self._memory_max.get(k, 0.0), numbers[k])
        times = {k[: -len("_time_s")]: v for k, v in numbers.items() if k.endswith("_time_s")}
        if self._first_times is None:
            self._first_times = times
            return
        for k, v in times.items():
            total = self._time_sums.setdefault(k, [0.0, 0])
            total[0] += v
            total[1] += 1

    def summary_figures(self) -> dict[str, Any]:
        """Step-time breakdown means (seconds per step over this invocation's logged rows, the
        first left out as warm-up when there are more) and rank 0's memory high-water marks."""
        if self._time_sums:
            breakdown = {k: total / n for k, (total, n) in self._time_sums.items()}
        else:
            breakdown = dict(self._first_times or {})
        return {"step_time_breakdown_s": breakdown, **self._memory_max}

    def finish(self, summary: dict[str, Any]) -> None:
        summary = {**summary, **self.summary_figures()}
        (self.run_dir / "summary.json").write_text(
            json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2) + "\n"
        )
        if self.wandb is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float)):
                    self.wandb.summary[k] = v
            for phase, v in summary["step_time_breakdown_s"].items():
                self.wandb.summary[f"time/{phase}_s_mean"] = v
            self.wandb.finish()
            self.wandb = None
        self.close()
        from trainer.worker.observability.plot import try_plot_run

        try_plot_run(self.run_dir)  # after close: every row is on disk

    def close(self) -> None:
        for f in (self._metrics, self._eval):
            if not f.closed:
                f.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1)
            self.wandb = None


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
