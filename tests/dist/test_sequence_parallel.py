"""Ulysses sequence parallelism (trainer/worker/parallel.py apply_sp) against the whole model,
in 2 gloo processes without DeepSpeed: each rank's logits equal its slice of a single process's
logits, and the gradients summed over the sequence ranks equal the single process's gradients
of the mean loss (times the number of ranks: each rank's loss is the mean over its slice), for
the gpt-tiny shape (learned positions, offset by the slice) and a llama-style one (RoPE over the
whole sequence, grouped-query attention: 4 query and 2 key/value heads over 2 ranks), with and
without activation checkpointing. The whole training path with SP is held to a single process
and the reference loop in tests/dist/test_reference_parity.py."""

from __future__ import annotations

import pytest
from single_engine import run_ranks

pytestmark = pytest.mark.timeout(600)

SCRIPT = """
import json, os
import torch, torch.distributed as dist
from models.gpt import GPT, GPTConfig
from trainer.layout import make_layout
from trainer.worker.parallel import apply_sp

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
shapes = {
    "gpt": dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=32),
    "llama": dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                  pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                  tie_embeddings=False),
}
out = {}
for name, kw in shapes.items():
    for ac in (False, True):
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(**kw, activation_checkpointing=ac))
        idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
        tgt = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(2))
        logits, loss = gpt(idx, tgt)
        loss.backward()
        whole = {n: p.grad.clone() for n, p in gpt.named_parameters()}
        gpt.zero_grad()
        apply_sp(gpt, make_layout(world, 1, 1, sp=world), rank)
        t = 32 // world
        part = slice(rank * t, (rank + 1) * t)
        mine, loss_r = gpt(idx[:, part], tgt[:, part])
        loss_r.backward()
        err_logits = (mine - logits[:, part]).abs().max().item()
        err_grad, scale = 0.0, max(g.abs().max().item() for g in whole.values())
        for n, p in gpt.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)
            err_grad = max(err_grad, (g / world - whole[n]).abs().max().item() / scale)
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss_r.detach())
        out[f"{name}-ac{int(ac)}"] = dict(
            logits=err_logits, grad=err_grad, loss=abs(sum(l.item() for l in losses) / world - loss.item()))
print("RESULT " + json.dumps(out))
"""


def test_ulysses_slices_equal_the_whole_model():
    results = run_ranks(SCRIPT, world=2, timeout=300)
    for rank, errors in enumerate(results):
        assert set(errors) == {"gpt-ac0", "gpt-ac1", "llama-ac0", "llama-ac1"}
        for case, e in errors.items():
            assert e["logits"] < 1e-5, (rank, case, e)
            assert e["grad"] < 1e-5, (
                rank,
                case,
                e,
            )  # relative to the largest gradient entry of all
            assert e["loss"] < 1e-5, (rank, case, e)
