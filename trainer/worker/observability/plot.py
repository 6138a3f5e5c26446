"""run_dir/loss.png: train and val loss against step, tokens/s on a second panel.

Drawn from metrics.jsonl and eval.jsonl, so a resumed run plots its whole history; a step
logged twice (re-run after a resume or a rollback) counts once, its last record.

    python -m trainer.worker.observability.plot runs/<name>     # redraw a run's plot
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional


def _float(v) -> float:
    try:
        return float(v)  # non-finite values are stored as the strings "nan" / "inf"
    except (TypeError, ValueError):
        return math.nan


def last_per_step(path: Path, key: str) -> tuple[list[int], list[float]]:
    """Steps (sorted) and the value of `key` in the last record of each; [] if no file."""
    return last_per_step_of(path.read_text() if path.is_file() else "", key)


def last_per_step_of(text: str, key: str) -> tuple[list[int], list[float]]:
    """last_per_step of a JSONL file's text (a sweep reads its jobs' files from any storage)."""
    by_step: dict[int, float] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(row, dict) and "step" in row and key in row:
            by_step[int(row["step"])] = _float(row[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_run(run_dir: Path, out: Optional[Path] = None) -> Optional[Path]:
    """Writes the plot (default run_dir/loss.png) and returns its path; None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    steps, loss = last_per_step(run_dir / "metrics.jsonl", "loss")
    val_steps, val_loss = last_per_step(run_dir / "eval.jsonl", "val_loss")
    tps_steps, tps = last_per_step(run_dir / "metrics.jsonl", "tokens_per_sec")
    if not steps and not val_steps:
        return None
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    try:
        if steps:
            top.plot(steps, loss, label="train loss", linewidth=1)
        if val_steps:
            top.plot(val_steps, val_loss, "o-", label="val loss", markersize=3)
        top.set_ylabel("loss")
        top.set_title(run_dir.name)
        top.grid(alpha=0.3)
        top.legend()
        bottom.plot(tps_steps, tps, color="tab:green", linewidth=1)
        bottom.set_ylabel("tokens/s")
        bottom.set_xlabel("step")
        bottom.grid(alpha=0.3)
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        out = Path(out) if out is not None else run_dir / "loss.png"
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def try_plot_run(run_dir: Path) -> Optional[Path]:
    """plot_run that never raises: a plot must not fail a run (prints one warning line)."""
    try:
        return plot_run(run_dir)
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not draw {Path(run_dir) / 'loss.png'}: {type(e).__name__}: {e}")
        return None


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m trainer.worker.observability.plot RUN_DIR")
    print(plot_run(Path(sys.argv[1])) or "nothing to plot")
