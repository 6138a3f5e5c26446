"""Host syncs per training step: a step that logs nothing may not wait for the device.

A real Trainer (DeepSpeed on CPU with gloo, world size 1, 2 micro batches per step) runs its
own train() in a child process with every Tensor method that reads a value back to the host
wrapped by a counter (item, __bool__, __float__, __int__, tolist, cpu, numpy). On a GPU each
of them waits for the device's queue to drain. Each call made from the training thread is
recorded with the step it happened in and its call site (the first frame outside torch).
A step that logs nothing may make only the calls in ALLOWED, each there for the reason it
names (DeepSpeed's own gradient clipping and reduction); a new one fails the test, naming it.
On a GPU the same run uses torch.cuda.set_sync_debug_mode("error") (marked gpu).
"""

from __future__ import annotations

import json
import textwrap

import pytest
from single_engine import run_single_process

pytestmark = pytest.mark.timeout(600)

# (call site, what it reads) -> why a step that logs nothing may still make it.
ALLOWED: dict[tuple[str, str], str] = {
    ("trainer/worker/readback.py:read", "tolist"): (
        "the guard's loss and the stop flags, read from a host copy queued earlier: on CUDA a "
        "non-blocking copy to pinned memory behind an event, read after the backward is "
        "queued (the device keeps working); on the CPU the values already are on the host"
    ),
    ("deepspeed/runtime/engine.py:_take_model_step", "item"): (
        "torch.optim.AdamW (not fused) reads each parameter's step counter, a CPU tensor "
        "also on a GPU run (no device sync; fused AdamW keeps it on the device, reads none)"
    ),
    ("deepspeed/runtime/zero/stage_1_and_2.py:_optimizer_step", "item"): (
        "the same AdamW step counters, stepped by DeepSpeed's ZeRO-1/2 optimizer"
    ),
    ("deepspeed/runtime/utils.py:is_invalid_grad_norm", "__bool__"): (
        "DeepSpeed ZeRO-1/2 checks the all-reduced global gradient norm on the host before "
        "it clips and steps (its overflow skip): what the gradient reduction itself needs"
    ),
}

COUNTED = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, traceback, types
    from pathlib import Path
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq
    import torch
    from data_pipeline.manifest import (MANIFEST_VERSION, Manifest, ShardInfo, SplitInfo,
                                        TokenizerInfo)
    from trainer.config import load_config
    from trainer.worker.entry import WorkerConfig
    from trainer.worker.loop import Trainer

    root = Path(sys.argv[1])
    here = {"step": 0}
    calls = []
    SEQ, VOCAB = 32, 320

    def write_split(split, rows, seed):
        tokens = np.random.default_rng(seed).integers(0, VOCAB, (rows, SEQ + 1), dtype=np.int32)
        name = f"{split}-00000-000.parquet"
        column = pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), SEQ + 1)
        pq.write_table(pa.table({"tokens": column}), root / "data" / name)
        return SplitInfo(shards=[ShardInfo(file=name, rows=rows)], num_samples=rows,
                         num_tokens=rows * (SEQ + 1))

    (root / "data").mkdir(parents=True)
    splits = {"train": write_split("train", 256, 0), "val": write_split("val", 32, 1)}
    Manifest(version=MANIFEST_VERSION, name="syncs",
             tokenizer=TokenizerInfo(file="tokenizer.json", sha256="0" * 64,
                                     vocab_size=VOCAB, eos_id=0),
             seq_len=SEQ, splits=splits, sources=["syncs"],
             num_documents={"train": 256, "val": 32}, settings={}, fingerprint="",
             created="2024-01-01T00:00:00+00:00").save(root / "data")

    cuda = os.environ.get("SYNCS_ON") == "cuda"
    if cuda:  # every synchronizing CUDA call warns, with the step it happened in
        import warnings
        torch.cuda.set_device(0)
        torch.cuda.set_sync_debug_mode("warn")
        warnings.simplefilter("always")
        def warned(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                calls.append({"step": here["step"], "what": "cuda sync", "site": site()})
        warnings.showwarning = warned
    main = threading.get_ident()
    TORCH = os.path.dirname(torch.__file__)

    def site():
        for frame in reversed(traceback.extract_stack()[:-2]):
            if not frame.filename.startswith(TORCH):
                f = frame.filename
                for top in ("/site-packages/", os.getcwd() + "/"):
                    if top in f:
                        f = f.split(top, 1)[1]
                return f"{f}:{frame.name}"
        return "?"

    def counting(name, original):
        def wrapper(self, *a, **k):
            if threading.get_ident() == main and not torch.compiler.is_compiling():
                calls.append({"step": here["step"], "what": name, "site": site()})
            return original(self, *a, **k)
        return wrapper

    for name in () if cuda else %(counted)r:
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

    step = Trainer.step
    def marked_step(self):
        here["step"] = self.state.step + 1
        return step(self)
    Trainer.step = marked_step

    context = types.SimpleNamespace(rank=0, world_size=1, node_id=lambda: "local",
                                    stop_requested=lambda: None)
    out = {}
    for parallel in sys.argv[2:]:
        cfg = load_config([
            "+experiment=smoke", f"parallel={parallel}",
            "model.n_layer=1", "model.d_model=32", "model.n_head=2",
            f"model.vocab_size={VOCAB}", f"model.block_size={SEQ}", f"data.seq_len={SEQ}",
            f"data.vocab_size={VOCAB}", "cluster.num_workers=1", "cluster.cpus_per_worker=1",
            "precision=bf16" if cuda else "precision=fp32",
            "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
            "trainer.max_steps=8", "logging.log_interval=4", "trainer.eval_interval=4",
            "trainer.checkpoint_interval=0", "trainer.sample_tokens=0",
            "logging.mode=disabled", f"run.root={root / 'runs'}", f"run.name={parallel}",
        ])
        assert cfg.grad_accum == 2
        calls.clear()
        here["step"] = 0
        Trainer(WorkerConfig(cfg=cfg, data_dir=str(root / "data"), invocation="syncs",
                             peak_flops=1e12), context).train()
        out[parallel] = {"calls": list(calls), "log_interval": cfg.logging.log_interval,
                         "last": cfg.trainer.max_steps}
    print("RESULT " + json.dumps(out))
    """
) % {"counted": COUNTED}

LAYOUTS = ["ddp", "zero2"]


def syncs_on_quiet_steps(result: dict, allowed: dict) -> list[str]:
    """'<layout> step <n>: <what> at <site>' for each sync of a step that logs nothing."""
    report = []
    for parallel, run in result.items():
        every, last = run["log_interval"], run["last"]
        quiet = [s for s in range(1, last + 1) if s % every and s != last]
        assert quiet, "the run must have steps that log nothing"
        for c in run["calls"]:
            if c["step"] in quiet and (c["site"], c["what"]) not in allowed:
                report.append(f"{parallel} step {c['step']}: {c['what']} at {c['site']}")
    return report


def test_a_step_that_logs_nothing_makes_no_host_sync(tmp_path):
    result = run_single_process(SCRIPT, str(tmp_path), *LAYOUTS, timeout=580)
    report = syncs_on_quiet_steps(result, ALLOWED)
    assert not report, "\n".join(report)
    # The counter does see raygpt's reads: a logged step reads the loss and the norm.
    for run in result.values():
        logged = {c["site"] for c in run["calls"] if c["step"] == run["log_interval"]}
        assert "trainer/worker/loop.py:log" in logged, logged


@pytest.mark.gpu
def test_a_step_that_logs_nothing_makes_no_cuda_sync(tmp_path):
    """The same run on CUDA (bf16, NCCL world size 1) under torch.cuda.set_sync_debug_mode:
    every synchronizing CUDA call is recorded; a quiet step may make only DeepSpeed's check of
    the reduced gradient norm (ZeRO-1/2). The host copies of trainer/worker/readback.py are
    not device syncs there, so they are not allowed."""
    import os
    import subprocess
    import sys

    import torch
    from single_engine import ROOT

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    env = {**os.environ, "SYNCS_ON": "cuda", "DS_ACCELERATOR": "cuda", "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), *LAYOUTS],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=580,
    )  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    allowed = {("deepspeed/runtime/utils.py:is_invalid_grad_norm", "cuda sync"): "see ALLOWED"}
    report = syncs_on_quiet_steps(json.loads(lines[0][len("RESULT ") :]), allowed)
    assert not report, "\n".join(report)
