"""The memory options train the same numbers as without them on real DeepSpeed engines, at
ZeRO stages 0 and 3 (ZeRO-1/2 reduce as 0 does here, one process): the chunked loss with
several chunks per micro batch (trainer.loss_chunk_tokens, models/loss.py) and activation
checkpointing of the first blocks from outside the model (activation_checkpointing "auto",
trainer/worker/parallel.py apply_ac_blocks), which also keeps the parameter names. fp32, one process (gloo) in a child
process, so no process group is left behind in the test session."""

from __future__ import annotations

import textwrap

import pytest
from single_engine import run_single_process

ENGINE_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from models.gpt import GPTConfig
    from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig
    from trainer.worker.engine import build_engine, build_model, train_step
    from trainer.layout import Layout

    layout = Layout(world=1, dp=1, tp=1, pp=1)
    m = GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, d_model=32)
    sizes = dict(layout=layout, micro_batch=2, grad_accum=2)
    g = torch.Generator().manual_seed(0)
    batches = [
        [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
         for _ in range(2)]
        for _ in range(3)
    ]
    prec = PrecisionConfig(name="fp32", bf16=False)
    opt = OptimConfig(lr=1e-2, warmup_steps=0)

    def train(stage, loss_chunk, ac_blocks):
        par = ParallelConfig(name=f"zero{stage}", zero_stage=stage)
        model = build_model(m, par, prec, opt, seed=0, **sizes)
        names = [n for n, _ in model.named_parameters()]
        engine = build_engine(
            model, par, prec, opt, loss_chunk=loss_chunk, ac_blocks=ac_blocks, **sizes
        )
        losses = []
        for batch in batches:
            step_losses, _, _ = train_step(engine, batch, tp=1)
            losses.append([x.item() for x in step_losses])
        same = names == [n for n, _ in engine.module.named_parameters()]
        return {"losses": losses, "same_names": same}

    out = {}
    for stage in (0, 3):
        out[f"z{stage}"] = train(stage, 0, 0)
        out[f"z{stage}-chunked-ac"] = train(stage, 10, 2)  # 32 tokens: chunks of 10, 10, 10, 2
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.drill  # make test-drills: four engine builds, minutes on the shared 2 cores
@pytest.mark.timeout(600)
def test_chunked_loss_and_block_checkpointing_train_like_the_plain_engine():
    out = run_single_process(ENGINE_SCRIPT, timeout=580)
    for stage in (0, 3):
        plain, chunked = out[f"z{stage}"], out[f"z{stage}-chunked-ac"]
        assert chunked["same_names"], (stage, "checkpointing changed parameter names")
        flat = [x for step in plain["losses"] for x in step]
        got = [x for step in chunked["losses"] for x in step]
        # fp32: the loss summed chunk by chunk, in another order
        assert got == pytest.approx(flat, rel=1e-6), (stage, out)
        assert flat[-1] < flat[0]  # it trains
