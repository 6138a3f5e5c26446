"""Checkpoint: DeepSpeed save/load seconds against the bytes written and this disk's measured
sequential write bandwidth; and the time from a restart to the first new training step.

1. A single-process DeepSpeed engine (gloo, world size 1, DS_ACCELERATOR=cpu; the same
   trainer.engine.build_engine as the workers, ZeRO-2 bf16) after one step, so the optimizer
   state exists: engine.save_checkpoint seconds (DeepSpeed does not fsync: the bytes may still
   sit in the page cache), save + os.sync, and engine.load_checkpoint (from the page cache).
   The disk's bandwidth: write + fsync of a 256 MiB file.
2. Restart: a short raygpt run (2 workers) ending in a checkpoint, then the same run name
   again with more max_steps. Launch -> first metrics.jsonl row, for the fresh run and for
   the resumed one (polled from this process; core code has no timestamps for it).

    python -m bench.checkpoint [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

from bench import common


def disk_write_bandwidth(path: Path, mib: int = 256, chunk_mib: int = 8) -> float:
    """Bytes/s of a sequential write + fsync of a `mib` MiB file (deleted afterwards)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = os.urandom(chunk_mib << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mib // chunk_mib):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    path.unlink()
    return (mib // chunk_mib) * (chunk_mib << 20) / dt


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
    )
    dist.init_process_group("gloo", rank=0, world_size=1)


def engine_checkpoint(model_overrides: list[str], root: Path, seq: int = 256) -> dict[str, float]:
    """Save/load seconds and bytes of one DeepSpeed engine's checkpoint (ZeRO-2, bf16)."""
    import torch

    from models.gpt import GPT
    from trainer.worker.engine import build_engine

    init_single_process_group()
    cfg = common.load_cfg(
        [*model_overrides, f"model.block_size={seq}", "cluster.num_workers=1", "precision=bf16"]
    )
    torch.manual_seed(0)
    model = GPT(cfg.model)
    sizes: dict[str, Any] = {"micro_batch": 2, "grad_accum": 1}
    if "layout" in inspect.signature(build_engine).parameters:
        sizes["layout"] = cfg.layout  # world 1 = data 1 x tensor 1 x pipeline 1
    else:
        sizes["dp_size"] = 1
    engine = build_engine(model, cfg.parallel, cfg.precision, cfg.optim, **sizes)
    x = torch.randint(0, cfg.model.vocab_size, (2, seq))
    _, loss = engine(x, x)
    engine.backward(loss)
    engine.step()
    d = root / "engine-ckpt"
    shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    engine.save_checkpoint(str(d), tag="ds")
    save_s = time.perf_counter() - t0
    os.sync()
    save_sync_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    path, _ = engine.load_checkpoint(str(d), tag="ds", load_optimizer_states=True)
    load_s = time.perf_counter() - t0
    assert path is not None, f"no checkpoint loaded from {d}"
    n = dir_bytes(d)
    shutil.rmtree(d, ignore_errors=True)
    return {
        "params": model.num_params(),
        "bytes": n,
        "save_s": save_s,
        "save_sync_s": save_sync_s,
        "load_s": load_s,
        "zero_stage": cfg.parallel.zero_stage,
        "precision": cfg.precision.dtype_name,
    }


class FirstRow:
    """Polls a metrics.jsonl and records when a row with step > after_step first appears."""

    def __init__(self, path: Path, after_step: int, interval_s: float = 0.05):
        self.path, self.after_step, self.interval_s = Path(path), after_step, interval_s
        self.t0 = time.perf_counter()
        self.seconds: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> FirstRow:
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set() and self.seconds is None:
            if any(r["step"] > self.after_step for r in _rows(self.path)):
                self.seconds = time.perf_counter() - self.t0
                return
            time.sleep(self.interval_s)


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        return common.read_jsonl(path)
    except ValueError:  # a line caught half-written
        return []


def restart_time(steps: int, more: int, quick: bool) -> dict[str, Any]:
    name = "ckpt-restart" + ("-quick" if quick else "")

    def overrides(max_steps: int) -> list[str]:
        return common.train_overrides(
            256,
            run_name=name,
            steps=max_steps,
            workers=2,
            cpus_per_worker=1,
            micro_batch=8,
            global_batch=16,
            precision="bf16",
            quick=quick,
        )

    run_dir = common.load_cfg(overrides(steps)).run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    with FirstRow(run_dir / "metrics.jsonl", 0) as fresh:
        common.run_raygpt(overrides(steps), fresh=False)
    fresh_total = time.perf_counter() - t0
    ckpt = max(run_dir.glob("checkpoint_[0-9]*"))
    t0 = time.perf_counter()
    with FirstRow(run_dir / "metrics.jsonl", steps) as resumed:
        common.run_raygpt(overrides(steps + more), fresh=False)
    resumed_total = time.perf_counter() - t0
    return {
        "fresh_first_step_s": fresh.seconds,
        "resumed_first_step_s": resumed.seconds,
        "fresh_total_s": fresh_total,
        "resumed_total_s": resumed_total,
        "checkpoint_bytes": dir_bytes(ckpt),
        "checkpoint": str(ckpt),
    }


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    common.header("checkpoint: save/load, disk bandwidth, restart to first step")
    root = common.BENCH_DIR / "ckpt"
    mib = 64 if args.quick else 256
    bw = disk_write_bandwidth(root / "disk-bench.bin", mib=mib)
    print("restart: a short run, then the same run name with more steps ...", flush=True)
    # The engine part below initialises torch.distributed in this process: the Ray runs go first.
    for attempt in (1, 2):
        try:
            rs = restart_time(args.steps, args.more_steps, args.quick)
            break
        except Exception as e:  # noqa: BLE001 - printed, then retried once or raised
            if attempt == 2:
                raise
            print(f"restart measurement failed ({type(e).__name__}: {e}); retrying once")
    common.print_table(
        "launch -> first new metrics.jsonl row (run_training, 2 workers, gpt-tiny bf16)",
        ["run", "launch -> first step s", "whole run_training s"],
        [
            [f"fresh ({args.steps} steps)", rs["fresh_first_step_s"], rs["fresh_total_s"]],
            [
                f"resumed from step {args.steps} ({rs['checkpoint_bytes'] / 2**20:.0f} MiB ckpt)",
                rs["resumed_first_step_s"],
                rs["resumed_total_s"],
            ],
        ],
        caption="resumed - fresh = the cost of reading the checkpoint back through Ray Train.",
    )
    models = {"gpt-tiny": common.model_overrides(256, 6, 8)}
    if not args.quick:
        models["d768-L2"] = common.model_overrides(768, 2, 12)
    rows, engines = [], {}
    for name, ov in models.items():
        e = engine_checkpoint(ov, root)
        engines[name] = e
        rows.append(
            [
                f"{name} ({e['params'] / 1e6:.1f} M params)",
                e["bytes"] / 2**20,
                e["save_s"],
                e["bytes"] / 2**20 / e["save_s"],
                e["save_sync_s"],
                e["bytes"] / 2**20 / e["save_sync_s"],
                e["load_s"],
                e["save_sync_s"] / (e["bytes"] / bw),
            ]
        )
    common.print_table(
        f"DeepSpeed checkpoint (ZeRO-2, bf16, 1 process); disk: {bw / 2**20:.0f} MiB/s "
        f"(write + fsync of {mib} MiB)",
        ["model", "MiB", "save s", "save MiB/s", "save+sync s", "MiB/s", "load s",
         "save+sync / (bytes / disk bw)"],
        rows,
        caption="save: engine.save_checkpoint (no fsync); load: from the page cache.",
    )  # fmt: skip
    common.print_command("bench.checkpoint", argv)
    result = {
        "disk_write_bytes_per_s": bw,
        "engine": engines,
        "restart": rs,
        "command": common.command("bench.checkpoint", argv),
    }
    common.write_result("checkpoint", result)
    return result


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint")
    p.add_argument("--quick", action="store_true", help="gpt-tiny only, 64 MiB disk test")
    p.add_argument("--steps", type=int, default=None, help="steps of the first run (default 4)")
    p.add_argument("--more-steps", type=int, default=2, help="extra steps of the resumed run")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 4)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.cli(run, parse, argv)


if __name__ == "__main__":
    main()
