"""bench/gpu_check.py, the worker's GPU path in one process, dry-run on the CPU (gloo, a tiny
model shaped by conf/model/gpt-1.3b.yaml, activation checkpointing on): the code the GPU
machine runs executes end to end on real DeepSpeed engines: ZeRO-3 built partitioned
(deepspeed.zero.Init + init_weights), train_step on host batches, eval, a guarded NaN skip
that leaves the parameters alone, a checkpoint save/load that restores the eval loss, and
generation; and the bare PyTorch loop it is compared with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _check(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu_check",
            "--cpu-dry-run",
            "--peak-flops",
            "1e11",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--out",
            str(out),
            "--model",
            "gpt-1.3b",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    assert proc.returncode == 0 and rows and rows[-1]["ok"], (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
    return rows[-1]


def test_gpu_check_dry_run_zero3_partitioned(tmp_path):
    r = _check(tmp_path, "--stage", "3", "--checkpoint", "--generate")
    assert r["backend"] == "gloo" and r["device"] == "cpu"
    assert r["guard"] == {
        "skipped": True,
        "reason": "non-finite loss (nan)",
        "params_unchanged": True,
        "next_step_trains": True,
    }
    assert r["ckpt"]["restored"] == r["ckpt"]["at_save"] != r["ckpt"]["moved"]
    assert len(r["generated"]) == 10 and r["tokens_per_sec"] > 0 and r["mfu"] > 0


def test_gpu_check_dry_run_bare_loop(tmp_path):
    r = _check(tmp_path, "--bare")
    assert r["kind"] == "bare" and r["tokens_per_sec"] > 0
