"""Model-state memory per worker for each parallel layout, against theory.

    python -m bench.memory            # gpt-tiny shape (6 x 256), fp32, 3 steps per layout
    python -m bench.memory --quick    # a 2-layer model

Each layout trains a few steps on local Ray; every worker writes run_dir/memory/rank_<r>.json
(parameters it holds, the optimizer's fp32 master copy and Adam moments, RSS). Theory, with P
the model's parameter bytes in fp32 and Adam's two moments (2P):
    parameters: P, or P/dp under ZeRO-3, ~P/tp under tensor parallel, ~P/pp per pipeline stage,
                ~P/(tp x pp) in 3-D; P under sequence parallelism (every rank holds the model)
    optimizer:  2P (moments; ZeRO-0 fp32 steps the model's own tensors), or 3P/dp under
                ZeRO 1-3 (an fp32 master partition + moments), ~3P/tp, ~3P/pp (ZeRO-1, dp 1),
                ~3P/(tp x pp) in 3-D; sequence ranks shard ZeRO state as data ranks do (3P/2)
(~: embeddings and norms are replicated under TP; stages differ in size under PP.)
Then peak RSS with and without activation checkpointing at a larger micro batch.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from models.gpt import estimate_num_params
from trainer.config import load_config

LAYOUTS = [  # name, overrides, workers
    ("single (ZeRO-0)", ["parallel=ddp"], 1),
    ("dp2 ZeRO-0", ["parallel=ddp"], 2),
    ("dp2 ZeRO-1", ["parallel=zero1"], 2),
    ("dp2 ZeRO-2", ["parallel=zero2"], 2),
    ("dp2 ZeRO-3", ["parallel=zero3"], 2),
    ("dp2 ZeRO-3 + offload", ["parallel=zero3-offload"], 2),
    ("tp2 (ZeRO-1)", ["parallel=tp2"], 2),
    ("pp2 (ZeRO-1)", ["parallel=pp2"], 2),
    ("sp2 ZeRO-2", ["parallel=sp2"], 2),
    ("tp2xpp2 (ZeRO-1)", ["parallel=3d"], 4),
]


def base(quick: bool, data_dir: str) -> list[str]:
    shape = (
        ["model.n_layer=2", "model.d_model=128", "model.n_head=4"]
        if quick
        else ["model.n_layer=6", "model.d_model=256", "model.n_head=8"]
    )
    return [
        "+experiment=smoke",
        *shape,
        "precision=fp32",
        "logging.mode=disabled",
        "trainer.max_steps=3",
        "trainer.eval_interval=0",
        "trainer.checkpoint_interval=0",
        "trainer.sample_tokens=0",
        "trainer.micro_batch_size=4",
        "trainer.global_batch_size=8",
        f"data.out_dir={data_dir}",
    ]


def run(overrides: list[str], workers: int, root: Path, name: str) -> list[dict]:
    from trainer.driver.run import run_training

    cfg = load_config(
        [
            *overrides,
            f"cluster.num_workers={workers}",
            f"cluster.cpus_per_worker={2 / workers}",
            f"run.root={root}",
            f"run.name={name}",
        ]
    )
    run_training(cfg)
    files = sorted((root / name / "memory").glob("rank_*.json"))
    return [json.loads(f.read_text()) for f in files]


def theory(name: str, p_bytes: float, workers: int) -> tuple[float, float]:
    """(parameter bytes, optimizer bytes) per worker in theory."""
    params, optim = p_bytes, 2 * p_bytes
    if "ZeRO-3" in name:
        params, optim = p_bytes / workers, 3 * p_bytes / workers
    elif "tp2xpp2" in name:
        params, optim = p_bytes / 4, 3 * p_bytes / 4
    elif "tp2" in name or "pp2" in name:
        params, optim = p_bytes / 2, 3 * p_bytes / 2
    elif "ZeRO-1" in name or "ZeRO-2" in name:
        optim = 3 * p_bytes / workers
    return params, optim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import ray

    root = Path(tempfile.mkdtemp(prefix="raygpt-bench-memory-"))
    data_dir = os.environ.get("RAYGPT_BENCH_DATA", str(root / "data"))
    common = base(args.quick, data_dir)
    p_bytes = 4 * estimate_num_params(load_config(common, default_name="b").model)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    mib = 2**20
    try:
        table = Table(title=f"model-state bytes per worker (P = {p_bytes / mib:.1f} MiB fp32)")
        for col in (
            "layout",
            "rank",
            "params MiB",
            "theory",
            "optimizer MiB",
            "theory",
            "peak RSS MiB",
        ):
            table.add_column(col, justify="right")
        for i, (name, overrides, workers) in enumerate(LAYOUTS):
            t_params, t_optim = theory(name, p_bytes, workers)
            for r in run([*common, *overrides], workers, root, f"layout{i}"):
                optim = r["master_bytes"] + r["optim_state_bytes"]
                table.add_row(
                    name,
                    str(r["rank"]),
                    f"{r['param_bytes'] / mib:.2f}",
                    f"{t_params / mib:.2f}",
                    f"{optim / mib:.2f}",
                    f"{t_optim / mib:.2f}",
                    f"{r['peak_rss_mib']:.0f}",
                )
        Console().print(table)

        ac = Table(title="activation checkpointing: peak RSS growth during training (dp2 ZeRO-2)")
        for col in (
            "activation checkpointing",
            "rank",
            "RSS after build MiB",
            "peak RSS MiB",
            "peak - build MiB",
        ):
            ac.add_column(col, justify="right")
        big = ["parallel=zero2", "trainer.micro_batch_size=32", "trainer.global_batch_size=64"]
        for flag in ("false", "true"):
            reports = run(
                [*common, *big, f"model.activation_checkpointing={flag}"], 2, root, f"ac-{flag}"
            )
            for r in reports:
                ac.add_row(
                    flag,
                    str(r["rank"]),
                    f"{r['rss_after_build_mib']:.0f}",
                    f"{r['peak_rss_mib']:.0f}",
                    f"{r['peak_rss_mib'] - r['rss_after_build_mib']:.0f}",
                )
        Console().print(ac)
        print(f"command: python -m bench.memory{' --quick' if args.quick else ''}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
