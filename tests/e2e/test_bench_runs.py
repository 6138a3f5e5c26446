"""The benchmark code runs (no timing asserts): the bare training loop at each precision, and
cpu_share sees a spinning child process. (Moved from tests/unit/test_bench.py, which keeps the
helpers' arithmetic.)"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from bench.bare_loop import PRECISIONS, run_bare
from models.gpt import GPTConfig

TINY = GPTConfig(vocab_size=128, block_size=16, n_layer=1, n_head=2, d_model=32)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_bare_loop_runs_three_steps(precision):
    rows = np.random.default_rng(0).integers(0, TINY.vocab_size, size=(64, 17))
    r = run_bare(TINY, rows, micro_batch=2, grad_accum=2, steps=3, warmup=1, precision=precision)
    assert r.timed_steps == 3 and len(r.step_times) == 3 and len(r.losses) == 4
    assert math.isfinite(r.tokens_per_sec) and r.tokens_per_sec > 0
    assert math.isfinite(r.median_tokens_per_sec) and r.median_tokens_per_sec > 0
    assert all(math.isfinite(x) for x in r.losses)
    assert r.seq_len == 16 and r.flops_per_token > 0


@pytest.mark.serial  # needs the child to get a real share of a core
def test_cpu_share_sees_a_busy_process():
    import subprocess
    import sys

    from bench.cpu_share import cpu_seconds, shares

    assert os.getpid() in cpu_seconds()
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        _, rows = shares(1.0)
    finally:
        burner.kill()
        burner.wait()
    used = {pid: cores for cores, pid, _ in rows}
    assert used.get(burner.pid, 0.0) > 0.3, rows[:5]  # a spinning process: most of a core
