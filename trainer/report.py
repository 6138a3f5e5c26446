"""End-of-run summary for the console."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_summary(summary: dict[str, Any]) -> None:
    console = Console()
    if not summary:
        console.print("[red]the run produced no summary.json[/red]")
        return
    table = Table(title=f"raygpt run {summary.get('run_name', '')}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")

    def fmt(v: Any, spec: str = "") -> str:
        return "-" if v is None else format(v, spec) if spec else str(v)

    rows = [
        ("steps", f"{summary.get('final_step')}/{summary.get('max_steps')}"),
        ("final train loss", fmt(summary.get("final_train_loss"), ".4f")),
        ("final val loss", fmt(summary.get("final_val_loss"), ".4f")),
        ("val perplexity", fmt(summary.get("final_val_ppl"), ".2f")),
        ("uniform-guess loss ln(vocab)", fmt(summary.get("uniform_loss"), ".4f")),
        ("tokens/s", fmt(summary.get("tokens_per_sec"), ",.0f")),
        ("MFU", fmt(100 * summary["mfu"], ".1f") + "%" if summary.get("mfu") else "-"),
        ("parameters", fmt(summary.get("num_params"), ",")),
        (
            "workers x precision x ZeRO",
            f"{summary.get('num_workers')} x "
            f"{summary.get('precision')} x {summary.get('zero_stage')}",
        ),
        ("run directory", fmt(summary.get("run_dir"))),
        ("checkpoint", fmt(summary.get("checkpoint"))),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    if summary.get("sample"):
        console.print("[bold]sample:[/bold]")
        print(summary["sample"])
