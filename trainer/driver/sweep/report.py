"""A sweep's comparison, written at its end into its directory: summary.md (the table, printed
too), summary.json and compare.png (each job's validation and training loss against step,
overlaid and labelled by its overrides, above its final val loss and training tokens/s); and
the answer of `--check -m` (print_check)."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict
from typing import Optional

from data_pipeline import storage
from trainer.driver.sweep.plan import Job, SweepPlan
from trainer.driver.sweep.record import STATUSES, SweepRecord
from trainer.worker.observability.plot import last_per_step_of

# A job's curves: {"train": (steps, loss), "val": (steps, val_loss)}, from its run directory.
Curves = dict[str, tuple[list[int], list[float]]]
CURVE_FILES = {"val": ("eval.jsonl", "val_loss"), "train": ("metrics.jsonl", "loss")}


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(jobs: list[Job]) -> str:
    lines = [
        "| job | run | overrides | status | final val loss | tokens/s | wall s | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for j in jobs:
        lines.append(
            f"| {j.num} | {j.name} | {j.label} | {j.status} | {_fmt(j.final_val_loss, '.4f')} | "
            f"{_fmt(j.tokens_per_sec, ',.0f')} | {_fmt(j.wall_s, '.1f')} | "
            f"{(j.error or '').replace('|', '/')} |"
        )
    return "\n".join(lines)


def _color(job: Job) -> str:
    return {"finished": "tab:green", "failed": "tab:red"}.get(job.status, "tab:gray")


def _plot_losses(ax, jobs: list[Job]) -> None:
    """Close values: points on a zoomed axis, not bars from 0."""
    have = [(x, j) for x, j in enumerate(jobs) if j.final_val_loss is not None]
    losses = [j.final_val_loss for _, j in have]
    ax.scatter([x for x, _ in have], losses, color=[_color(j) for _, j in have], zorder=3)
    if losses:
        pad = (max(losses) - min(losses)) * 0.15 or abs(losses[0]) * 0.02 or 0.1
        ax.set_ylim(min(losses) - pad, max(losses) + pad)


def _plot_throughput(ax, jobs: list[Job]) -> None:
    vals = [j.tokens_per_sec for j in jobs]
    ax.bar(range(len(jobs)), [v or 0.0 for v in vals], color=[_color(j) for j in jobs])
    ax.set_ylim(0, max((v for v in vals if v is not None), default=1.0) * 1.15)


def _label_panel(ax, jobs: list[Job], key: str, spec: str, title: str) -> None:
    """Each job's value (or its status) above its point or bar; the job numbers and labels."""
    for x, j in enumerate(jobs):
        v = getattr(j, key)
        y = v if v is not None else ax.get_ylim()[0]
        text = j.status if v is None else format(v, spec)
        ax.annotate(
            text,
            (x, y),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 4),
            textcoords="offset points",
        )
    ax.set_title(title)
    ax.set_xticks(range(len(jobs)))
    ax.set_xticklabels([f"{j.num}\n{j.label}" for j in jobs], fontsize=7)
    ax.set_xlim(-0.6, len(jobs) - 0.4)
    ax.grid(axis="y", alpha=0.3)


def job_curves(root: str, jobs: list[Job]) -> dict[int, Curves]:
    """Each job's loss curves from its run directory run.root/<name> (any storage): the last
    record of each step (a resumed or rolled-back step counts once); empty where none."""
    curves: dict[int, Curves] = {}
    for j in jobs:
        curves[j.num] = {}
        for what, (file, key) in CURVE_FILES.items():
            try:
                text = storage.read_text(storage.join(root, j.name, file))
            except (OSError, ValueError):
                text = ""  # not started, or failed before its first row
            curves[j.num][what] = last_per_step_of(text, key)
    return curves


def _plot_curves(ax, jobs: list[Job], curves: dict[int, Curves], what: str, title: str) -> None:
    """One line per job that has points, labelled by its overrides; val points marked."""
    for j in jobs:
        steps, values = curves.get(j.num, {}).get(what, ([], []))
        if steps:
            marker = "o-" if what == "val" else "-"
            ax.plot(steps, values, marker, label=f"{j.num}: {j.label}", markersize=3, linewidth=1)
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7)


def compare_figure(name: str, jobs: list[Job], curves: Optional[dict[int, Curves]] = None):
    """The matplotlib figure of compare.png: validation and training loss against step of
    every job overlaid (top), its final val loss and training tokens/s (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = curves or {}
    fig, axes = plt.subplots(2, 2, figsize=(max(10, 1.6 * len(jobs) + 3), 9), squeeze=False)
    _plot_curves(axes[0][0], jobs, curves, "val", "validation loss")
    _plot_curves(axes[0][1], jobs, curves, "train", "training loss")
    loss_ax, tps_ax = axes[1]
    _plot_losses(loss_ax, jobs)
    _label_panel(loss_ax, jobs, "final_val_loss", ".4f", "final val loss")
    _plot_throughput(tps_ax, jobs)
    _label_panel(tps_ax, jobs, "tokens_per_sec", ",.0f", "training tokens/s")
    fig.suptitle(f"sweep {name} (final values: green finished, red failed, gray not finished)")
    fig.tight_layout()
    return fig


def compare_png(name: str, jobs: list[Job], curves: Optional[dict[int, Curves]] = None) -> bytes:
    fig = compare_figure(name, jobs, curves)  # selects the Agg backend before pyplot
    import matplotlib.pyplot as plt

    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()


def write_report(record: SweepRecord, wall_s: float) -> None:
    """Prints the comparison and writes summary.md, summary.json and compare.png."""
    plan, jobs = record.plan, record.sorted_jobs()
    table = markdown_table(jobs)
    counts = {s: sum(j.status == s for j in jobs) for s in STATUSES}
    line = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    done = [j for j in jobs if j.status == "finished" and j.final_val_loss is not None]
    best = min(done, key=lambda j: j.final_val_loss) if done else None
    best_line = (
        f"best: job {best.num} {best.name} ({best.label}), final val loss {best.final_val_loss:.4f}"
        if best
        else "best: none finished"
    )
    head = f"sweep {plan.name}: {line} in {wall_s:.1f} s; {best_line}"
    text = f"# {head}\n\n{table}\n\nfiles: {plan.dir}\n"
    storage.write_text(storage.join(plan.dir, "summary.md"), text)
    summary = {
        "sweep": plan.name,
        "dir": plan.dir,
        "fingerprint": plan.fingerprint,
        "group": plan.group,
        "wall_s": round(wall_s, 3),
        "counts": {s: n for s, n in counts.items() if n},
        "best": best.name if best else None,
        "jobs": [asdict(j) for j in jobs],
    }
    storage.write_text(storage.join(plan.dir, "summary.json"), json.dumps(summary, indent=1))
    try:
        png = compare_png(plan.name, jobs, job_curves(plan.root, jobs))
        storage.write_bytes(storage.join(plan.dir, "compare.png"), png)
    except Exception as e:  # noqa: BLE001 - the plot is a convenience; the table is the record
        print(f"sweep {plan.name}: no compare.png ({e})", file=sys.stderr)
    print(f"\n{head}\n{table}\nwritten: summary.md, summary.json, compare.png in {plan.dir}")
    for j in jobs:
        if j.status == "failed":
            print(f"error: {j.where()} failed: {j.error}", file=sys.stderr)


def print_check(plan: SweepPlan, jobs: list[Job]) -> None:
    """--check's answer: one line for people, then `ok: {json}` for cluster/submit.py."""
    plugin = "basic" not in str(plan.defn["sweeper"].get("_target_", "basic")).lower()
    what = "the sweeper's first batch: " if plugin else ""
    print(
        f"sweep {plan.name}: {what}{len(jobs)} job(s) valid, {plan.max_parallel} at a time; "
        f"directory {plan.dir} (not read: checked when the sweep runs)"
    )
    info = {
        "sweep": plan.name,
        "dir": plan.dir,
        "jobs": len(jobs),
        "run.root": plan.root,
        "cluster.address": plan.cluster.address,
        "storage_env": storage.remote_env(other_machines=True),  # for cluster/submit.py
    }
    print("ok: " + json.dumps(info), flush=True)
