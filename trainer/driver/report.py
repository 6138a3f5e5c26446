"""End-of-run summary for the console."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

PHASES = ("data", "forward", "backward", "optimizer")  # comm is shown inside backward


def step_breakdown(means: Optional[dict[str, float]]) -> str:
    """'0.512 s = data 0.002 + forward 0.150 + backward 0.300 (comm 0.080) + optimizer 0.040'.
    comm is part of backward; whatever the phases leave out (loss all-reduce, logging) is in
    the step total only."""
    if not means:
        return "-"
    parts = []
    for name in PHASES:
        if name in means:
            comm = f" (comm {means['comm']:.3f})" if name == "backward" and "comm" in means else ""
            parts.append(f"{name} {means[name]:.3f}{comm}")
    text = " + ".join(parts)
    if "step" in means:
        text = f"{means['step']:.3f} s" + (f" = {text}" if text else "")
    return text or "-"


def memory(summary: dict[str, Any]) -> str:
    parts = []
    if summary.get("peak_rss_mib") is not None:
        parts.append(f"RSS {summary['peak_rss_mib']:,.0f} MiB")
    if summary.get("cuda_peak_mib") is not None:
        parts.append(f"CUDA allocated {summary['cuda_peak_mib']:,.0f} MiB")
    if summary.get("cuda_reserved_mib") is not None:
        parts.append(f"reserved {summary['cuda_reserved_mib']:,.0f} MiB")
    return ", ".join(parts) or "-"


def print_summary(summary: dict[str, Any]) -> None:
    console = Console()
    if not summary:
        console.print("[red]the run produced no summary.json[/red]")
        return
    table = Table(title=f"raygpt run {summary.get('run_name', '')}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")

    def fmt(v: Any, spec: str = "") -> str:
        if v is None:
            return "-"
        if isinstance(v, str) or not spec:  # non-finite numbers arrive as "nan" / "inf"
            return str(v)
        return format(v, spec)

    rows = [
        ("steps", f"{summary.get('final_step')}/{summary.get('max_steps')}"),
        ("final train loss", fmt(summary.get("final_train_loss"), ".4f")),
        ("final val loss", fmt(summary.get("final_val_loss"), ".4f")),
        ("val perplexity", fmt(summary.get("final_val_ppl"), ".2f")),
        ("val bits per byte", fmt(summary.get("final_val_bpb"), ".4f")),
        ("uniform-guess loss ln(vocab)", fmt(summary.get("uniform_loss"), ".4f")),
        ("training tokens/s", fmt(summary.get("train_tokens_per_sec"), ",.0f")),
        ("end-to-end tokens/s", fmt(summary.get("end_to_end_tokens_per_sec"), ",.0f")),
        ("MFU", f"{100 * summary['mfu']:.1f}%" if isinstance(summary.get("mfu"), float) else "-"),
        ("step time (mean)", step_breakdown(summary.get("step_time_breakdown_s"))),
        ("peak memory, rank 0", memory(summary)),
        ("parameters", fmt(summary.get("num_params"), ",")),
        (
            "workers x precision x ZeRO",
            f"{summary.get('num_workers')} x "
            f"{summary.get('precision')} x {summary.get('zero_stage')}",
        ),
        ("run directory", fmt(summary.get("run_dir"))),
        ("checkpoint", fmt(summary.get("checkpoint"))),
    ]
    if summary.get("run_dir") and (Path(summary["run_dir"]) / "loss.png").is_file():
        rows.append(("loss plot", str(Path(summary["run_dir"]) / "loss.png")))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    if summary.get("sample"):
        console.print("[bold]sample:[/bold]")
        print(summary["sample"])
