"""Shared helpers of the benchmarks: environment, bench dataset, peak FLOP/s, runs, tables."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import median
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "runs" / "bench"
DATA_DIR = BENCH_DIR / "data"
RUNS_DIR = BENCH_DIR / "runs"
PYTHON = ".venv/bin/python"


def setup_env() -> None:
    """The environment raygpt's own entry points and tests use (before torch/ray import)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")


setup_env()


# ---------------------------------------------------------------------------- arithmetic


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing or b is not positive."""
    if a is None or b is None or not b > 0:
        return None
    return a / b


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float) -> float:
    """Achieved FLOP/s (flops_per_token x tokens/s) as a fraction of peak_flops."""
    return tokens_per_sec * flops_per_token / peak_flops


def steady_rows(rows: Sequence[dict[str, Any]], skip_frac: float = 0.2) -> list[dict[str, Any]]:
    """The metrics.jsonl rows after the first `skip_frac` of the run's steps (warm-up)."""
    if not rows:
        return []
    start = rows[0]["step"] - _steps_in(rows, 0)
    cut = start + skip_frac * (rows[-1]["step"] - start)
    return [r for r in rows if r["step"] > cut] or [rows[-1]]


def _steps_in(rows: Sequence[dict[str, Any]], i: int) -> int:
    """Steps covered by row i: the step gap to the previous row (the first row: its gap to the
    second, i.e. the log interval, bounded by its own step number)."""
    if i > 0:
        return rows[i]["step"] - rows[i - 1]["step"]
    if len(rows) > 1:
        return min(rows[1]["step"] - rows[0]["step"], rows[0]["step"])
    return 1


def steady_tokens_per_sec(
    rows: Sequence[dict[str, Any]], skip_frac: float = 0.2
) -> dict[str, float]:
    """Steady-state figures from metrics.jsonl rows: total tokens / total time over the rows
    after the first `skip_frac` of steps, and the median row's rate. Each row's `tokens_per_sec` and `step_time_s` are
    averages over the steps since the previous row, so a row covers
    steps x step_time_s seconds and tokens_per_sec x that many tokens."""
    all_rows = list(rows)
    kept = steady_rows(all_rows, skip_frac)
    index = {id(r): i for i, r in enumerate(all_rows)}
    steps = seconds = tokens = data_s = 0.0
    per_step_rates = []
    for r in kept:
        n = _steps_in(all_rows, index[id(r)])
        dt = r["step_time_s"] * n
        per_step_rates.append(r["tokens_per_sec"])
        steps += n
        seconds += dt
        tokens += r["tokens_per_sec"] * dt
        data_s += r.get("data_time_s", 0.0)  # measured on the logged step only
    return {
        "tokens_per_sec": tokens / seconds if seconds > 0 else float("nan"),
        # the median row (one step per row at log_interval 1): robust to a neighbour's burst
        "median_tokens_per_sec": median(per_step_rates) if per_step_rates else float("nan"),
        "step_time_s": seconds / steps if steps else float("nan"),
        "data_time_s": data_s / len(kept) if kept else float("nan"),
        "steps": steps,
        "rows": float(len(kept)),
    }


# ---------------------------------------------------------------------------- peak FLOP/s


def measure_peak(dtype: str, threads: int, n: int = 2048, seconds: float = 1.5) -> float:
    """Dense n x n matmul FLOP/s with `threads` torch threads (measured now, not cached; the
    best of three windows, so a neighbour's burst on a shared machine counts less)."""
    from trainer.worker.observability.metrics import matmul_flops

    return matmul_flops(dtype, threads, n=n, seconds=seconds)


# ---------------------------------------------------------------------------- data and runs


def load_cfg(overrides: Sequence[str], name: str = "bench"):
    """The raygpt RootConfig for `overrides` (validated like the CLI does)."""
    from trainer.config import load_config

    return load_config(list(overrides), default_name=name)


def data_overrides(seq_len: int = 256, quick: bool = False) -> list[str]:
    """The data.* overrides of the bench dataset for seq_len (under runs/bench/data). Every
    seq_len reuses the seq_len-256 tokenizer (one BPE training); quick: 150 documents."""
    out = DATA_DIR / (f"stdlib-{seq_len}" + ("-quick" if quick else ""))
    overrides = [f"data.out_dir={out}", f"data.seq_len={seq_len}"]
    if quick:
        overrides.append("data.max_documents=150")
    if seq_len != 256:
        base = Path(bench_data(256, quick))
        overrides.append(f"data.tokenizer={base / 'tokenizer.json'}")
    return overrides


def bench_data(seq_len: int = 256, quick: bool = False) -> str:
    """Prepares the bench dataset for seq_len once (later calls find it); its directory."""
    overrides = data_overrides(seq_len, quick)
    cfg = load_cfg([*overrides, f"model.block_size={seq_len}"])
    if not (Path(cfg.data.out_dir) / "manifest.json").is_file():
        print(f"preparing bench dataset {cfg.data.out_dir} ...", flush=True)
    from data_pipeline.prepare import prepare

    prepare(cfg.data)
    return cfg.data.out_dir


def train_overrides(
    seq_len: int,
    *,
    run_name: str,
    steps: int,
    workers: int,
    cpus_per_worker: float,
    micro_batch: int,
    global_batch: int,
    precision: str,
    parallel: str = "zero2",
    model: Sequence[str] = ("model=gpt-tiny",),
    log_interval: int = 1,
    logging_mode: str = "offline",
    quick: bool = False,
) -> list[str]:
    """Hydra overrides of one benchmark run: no periodic eval or checkpoint (one at the end),
    no generated sample, a metrics row every `log_interval` steps."""
    return [
        *model,
        f"model.block_size={seq_len}",
        f"precision={precision}",
        f"parallel={parallel}",
        *data_overrides(seq_len, quick),
        f"cluster.num_workers={workers}",
        f"cluster.cpus_per_worker={cpus_per_worker}",
        f"trainer.max_steps={steps}",
        f"trainer.micro_batch_size={micro_batch}",
        f"trainer.global_batch_size={global_batch}",
        "trainer.eval_interval=0",
        "trainer.eval_batches=1",
        "trainer.checkpoint_interval=0",
        "trainer.sample_tokens=0",
        "optim.warmup_steps=2",
        f"logging.mode={logging_mode}",
        f"logging.log_interval={log_interval}",
        f"run.root={RUNS_DIR}",
        f"run.name={run_name}",
    ]


def run_raygpt(
    overrides: Sequence[str], *, fresh: bool = True, attempts: int = 2
) -> tuple[dict[str, Any], Path]:
    """Trains with cluster.launch.run_training (a private local Ray); returns (summary, run_dir).
    fresh: delete an earlier run of the same name first (the same name would resume it).
    attempts: a failed run is started again from scratch (printed: on a loaded shared machine
    Ray's dashboard sometimes misses its start-up timeout)."""
    from trainer.driver.run import run_training

    cfg = load_cfg(overrides)
    for attempt in range(1, attempts + 1):
        if fresh:
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
        try:
            return run_training(cfg), cfg.run_dir
        except Exception as e:  # noqa: BLE001 - reported, then retried or raised
            if attempt == attempts or not fresh:
                raise
            print(f"raygpt run {cfg.run.name} failed ({type(e).__name__}: {e}); retrying once")
    raise AssertionError("unreachable")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def model_config(overrides: Sequence[str] = ("model=gpt-tiny",), seq_len: int = 256):
    """A GPTConfig from conf/model (with overrides), its block_size set to seq_len."""
    return load_cfg([*overrides, f"model.block_size={seq_len}", f"data.seq_len={seq_len}"]).model


def model_overrides(d_model: int, n_layer: int, n_head: int) -> list[str]:
    return [
        "model=gpt-tiny",
        f"model.d_model={d_model}",
        f"model.n_layer={n_layer}",
        f"model.n_head={n_head}",
    ]


# ---------------------------------------------------------------------------- printing


def console():
    from rich.console import Console

    return Console(width=120)


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = ""
) -> None:
    from rich.table import Table

    table = Table(title=title, caption=caption or None, caption_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    console().print(table)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def command(module: str, argv: Sequence[str]) -> str:
    """The shell command that reproduces a benchmark: `.venv/bin/python -m bench.<m> args`."""
    return " ".join([PYTHON, "-m", module, *(shlex.quote(a) for a in argv)])


def print_command(module: str, argv: Sequence[str]) -> None:
    print(f"reproduce: {command(module, argv)}", flush=True)


def cli(run: Callable[..., Any], parse: Callable[[list[str]], Any], argv: list[str] | None):
    """A benchmark's main: run(parse(argv), argv), argv defaulting to the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(parse(argv), argv)


def header(name: str) -> None:
    load = os.getloadavg()
    print(
        f"\n=== {name} === ({os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}: figures are noisy when other work shares the cores)",
        flush=True,
    )


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Saves a benchmark's figures as runs/bench/<name>.json (run_all reads them back)."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return path
