"""ZeRO-3 partitioned construction (deepspeed.zero.Init) gives exactly the weights of a whole
build: two real processes on gloo gather every parameter and compare bit for bit, in fp32 and
in bf16 (where the whole build is fp32 cast to bf16, as DeepSpeed casts it, and the
partitioned one draws in fp32 and casts each module's weights)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.timeout(300)


def _worker(rank: int, port: int, out: str, bf16: bool = False) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        import deepspeed

        from models.gpt import GPT, GPTConfig
        from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig
        from trainer.layout import make_layout
        from trainer.worker.engine import build_model, init_weights

        cfg = GPTConfig(
            n_layer=2,
            d_model=64,
            n_head=4,
            n_kv_head=2,
            vocab_size=128,
            block_size=32,
            pos_embedding="rope",
            norm="rmsnorm",
            mlp="swiglu",
        )
        whole = GPT(cfg)
        init_weights(whole, seed=7)
        part = build_model(
            cfg,
            ParallelConfig(zero_stage=3, partitioned_init=True),
            PrecisionConfig(name="bf16" if bf16 else "fp32", bf16=bf16),
            OptimConfig(),
            seed=7,
            layout=make_layout(2, 1, 1),
            micro_batch=2,
            grad_accum=1,
        )
        if bf16:
            whole = whole.bfloat16()  # what DeepSpeed's bf16 does to a whole build
            assert all(p.dtype == torch.bfloat16 for p in part.parameters())
        sizes = [p.ds_tensor.numel() for p in part.parameters()]
        with deepspeed.zero.GatheredParameters(list(part.parameters())):
            same = {
                n: torch.equal(p.data, q.data)
                for (n, p), (_, q) in zip(part.named_parameters(), whole.named_parameters())
            }
        torch.save(
            {"same": same, "local": sum(sizes), "full": whole.num_params()}, f"{out}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()
    # DeepSpeed's CPU shared-memory comm leaves a joinable C++ thread behind: a normal
    # interpreter exit sometimes aborts ("terminate called without an active exception")
    # after the result above is written. Skip the C++ teardown; a failure before the
    # torch.save still fails the test (no result file).
    os._exit(0)


def _run(tmp_path, bf16: bool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(tmp_path), bf16), nprocs=2, start_method="spawn")
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["same"] and all(r["same"].values()), r["same"]
        assert r["local"] <= r["full"] / 2 + 64  # each rank holds half (plus padding)


def test_partitioned_build_equals_whole_build(tmp_path):
    _run(tmp_path, bf16=False)


def test_bf16_partitioned_build_equals_whole_build_cast(tmp_path):
    _run(tmp_path, bf16=True)
