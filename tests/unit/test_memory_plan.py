"""activation_checkpointing "auto" (trainer/memory_plan.py) against a table of model sizes x
device memory whose answers are worked out by hand below, from the estimate's rules (its
module docstring), not from the code.

Common to every row unless it says otherwise: bf16, ZeRO-2 on one worker (data-parallel size
1: nothing sharded), micro batch 8, seq_len = the model's block_size, loss chunk 4096 tokens.
The budget is 0.85 x the device: 24 GiB CPU -> 20.4 GiB, 80 GiB H100 -> 68 GiB, 141 GiB H200
-> 119.85 GiB. 1 GiB = 2**30 bytes.

bf16 bytes per parameter: weight 2 + gradient 2 + fp32 accumulation 4 + fp32 master 4 + Adam
moments 8 = 20. Kept per token per block, in 2-byte elements: 6 d + 2 kv + 2 F (GELU) or 4 F
(SwiGLU); checkpointed: d. Other: chunk x V x (2 + 8) bytes + 3 d x 2 bytes per token.

gpt-tiny (P 6,901,760; d 256, F 1024, V 8192, 6 blocks, T 256; 2048 tokens):
  states 138,035,200 B = 0.129 GiB; block (1536 + 512 + 2048) x 2 x 2048 = 16 MiB, x 6 = 96 MiB;
  other 2048 x 8192 x 10 = 160 MiB + 3 MiB. total(0) = 0.38 GiB: fits anywhere -> 0.
gpt2-124m (P 124,475,904; d 768, F 3072, V 50304, 12 blocks, T 1024; 8192 tokens):
  states 2,489,518,080 B = 2.319 GiB; block (4608 + 1536 + 6144) x 2 x 8192 = 0.1875 GiB,
  x 12 = 2.25 GiB; other 4096 x 50304 x 10 = 1.919 GiB + 0.035 GiB.
  total(0) = 6.52 GiB < 20.4 -> 0 everywhere.
gpt-1.3b (P 1,315,819,520; d 2048, F 8192, V 50304, 24 blocks, T 2048; 16384 tokens):
  states 26,316,390,400 B = 24.509 GiB > 20.4: the CPU cannot hold it even with every block
  checkpointed -> 24, and the line says it does not fit. H100/H200: block (12288 + 4096 +
  16384) x 2 x 16384 = 1 GiB, x 24 = 24 GiB; other 1.919 + 0.1875 GiB.
  total(0) = 50.62 GiB < 68 -> 0 on both.
llama-1b (P 1,235,814,400: 16 blocks of 60,821,504, tied wte 128256 x 2048, final norm 2048;
  d 2048, kv 8 x 64 = 512, F 8192, V 128256; 16384 tokens):
  states 24,716,288,000 B = 23.019 GiB > 20.4 -> 16 on the CPU (does not fit). H100/H200:
  block (12288 + 1024 + 32768) x 2 x 16384 = 1.40625 GiB, x 16 = 22.5 GiB; other 4096 x 128256
  x 10 = 4.893 GiB + 0.1875. total(0) = 50.60 GiB < 68 -> 0 on both.

Rows where it partly fits:
gpt-1.3b, micro batch 16 (32768 tokens), H100: block 2 GiB, checkpointed 2048 x 2 x 32768 =
  0.125 GiB; fixed = states 24.509 + other (1.919 + 0.375) = 26.803 GiB.
  total(k > 0) = 26.803 + (24 - k) 2 + 0.125 k + 2 (one block recomputed) = 76.803 - 1.875 k
  <= 68 -> k >= 4.69 -> 5 (total(5) = 67.43, total(4) = 69.30). H200: total(0) = 74.80 < 119.85
  -> 0.
llama-1b, micro batch 16, H100: block 2.8125 GiB, checkpointed 0.125; fixed = 23.019 + 4.893
  + 0.375 = 28.286. total(0) = 73.29 > 68; total(k > 0) = 28.286 + 45 + 2.8125 - 2.6875 k =
  76.10 - 2.6875 k <= 68 -> k >= 3.01 -> 4 (65.35 against 68.04 at 3).
gpt2-124m, fp32, micro batch 64 (65536 tokens), 24 GiB CPU: 16 bytes per parameter (weight,
  gradient, Adam moments) = 1.855 GiB; block 12288 x 4 x 65536 = 3 GiB, x 12 = 36 GiB;
  checkpointed 768 x 4 x 65536 = 0.1875 GiB; other 4096 x 50304 x 12 = 2.303 + 3 x 768 x 4 x
  65536 = 0.5625 GiB. fixed = 4.720; total(0) = 40.72. total(k > 0) = 4.720 + 36 + 3 - 2.8125 k <= 20.4
  -> k >= 8.29 -> 9 of 12 (18.41 against 21.22 at 8).
"""

from __future__ import annotations

import functools

import pytest

from models.config import GPTConfig
from models.gpt import estimate_num_params
from trainer.config import ParallelConfig, PrecisionConfig, load_config
from trainer.layout import make_layout
from trainer.memory_plan import GIB, checkpointed_blocks, describe, estimate_memory

CPU, H100, H200 = 24 * GIB, 80 * GIB, 141 * GIB
BF16, FP32 = PrecisionConfig(name="bf16", bf16=True), PrecisionConfig(name="fp32")


def model(name: str) -> GPTConfig:
    return load_config([f"model={name}"]).model


def estimate(name: str, micro: int = 8, precision: PrecisionConfig = BF16):
    m = model(name)
    return estimate_memory(
        m,
        ParallelConfig(),
        precision,
        make_layout(1, 1, 1),
        num_params=estimate_num_params(m),
        micro_batch=micro,
        seq_len=m.block_size,
        loss_chunk=4096,
    )


# (model, micro batch, precision, device, blocks checkpointed, total(0) in GiB by hand)
TABLE = [
    ("gpt-tiny", 8, BF16, CPU, 0, 0.38),
    ("gpt-tiny", 8, BF16, H100, 0, 0.38),
    ("gpt-tiny", 8, BF16, H200, 0, 0.38),
    ("gpt2-124m", 8, BF16, CPU, 0, 6.52),
    ("gpt2-124m", 8, BF16, H100, 0, 6.52),
    ("gpt2-124m", 8, BF16, H200, 0, 6.52),
    ("gpt-1.3b", 8, BF16, CPU, 24, 50.62),
    ("gpt-1.3b", 8, BF16, H100, 0, 50.62),
    ("gpt-1.3b", 8, BF16, H200, 0, 50.62),
    ("llama-1b", 8, BF16, CPU, 16, 50.60),
    ("llama-1b", 8, BF16, H100, 0, 50.60),
    ("llama-1b", 8, BF16, H200, 0, 50.60),
    ("gpt-1.3b", 16, BF16, H100, 5, 74.80),
    ("gpt-1.3b", 16, BF16, H200, 0, 74.80),
    ("llama-1b", 16, BF16, H100, 4, 73.29),
    ("gpt2-124m", 64, FP32, CPU, 9, 40.72),
]


@pytest.mark.parametrize("name, micro, precision, device, blocks, total0", TABLE)
def test_auto_checkpointing_table(name, micro, precision, device, blocks, total0):
    e = estimate(name, micro, precision)
    assert e.total(0) / GIB == pytest.approx(total0, abs=0.01)
    assert checkpointed_blocks(e, device) == blocks
    line = describe(e, blocks, device, "cuda")
    assert f"{blocks} of {e.blocks} blocks" in line and "\n" not in line
    assert ("does not fit even so" in line) == (e.total(blocks) > 0.85 * device)


def test_partial_rows_by_hand():
    # the totals around the chosen k, from the docstring's derivations
    e = estimate("gpt-1.3b", 16)
    assert e.total(5) / GIB == pytest.approx(67.43, abs=0.01)
    assert e.total(4) / GIB == pytest.approx(69.30, abs=0.01)
    e = estimate("llama-1b", 16)
    assert e.total(4) / GIB == pytest.approx(65.35, abs=0.01)
    assert e.total(3) / GIB == pytest.approx(68.04, abs=0.01)
    e = estimate("gpt2-124m", 64, FP32)
    assert e.total(9) / GIB == pytest.approx(18.41, abs=0.01)
    assert e.total(8) / GIB == pytest.approx(21.22, abs=0.01)


def test_sharding_and_model_parallel_divide_the_states():
    m = model("gpt-1.3b")
    p = estimate_num_params(m)
    sizes = dict(num_params=p, micro_batch=8, seq_len=2048, loss_chunk=4096)

    def states(parallel: ParallelConfig, world: int = 8, tp: int = 1) -> float:
        layout = make_layout(world, tp, 1)
        return estimate_memory(m, parallel, BF16, layout, **sizes).states / p

    # bytes per parameter over 8 data-parallel ranks: ZeRO-1 shards master + moments (12),
    # ZeRO-2 the gradients and their accumulation (6) too, ZeRO-3 the weights (2) too
    assert states(ParallelConfig(zero_stage=0)) == pytest.approx(20, abs=1e-6)
    assert states(ParallelConfig(zero_stage=1)) == pytest.approx(8 + 12 / 8, abs=1e-6)
    assert states(ParallelConfig(zero_stage=2)) == pytest.approx(2 + 18 / 8, abs=1e-6)
    assert states(ParallelConfig(zero_stage=3)) == pytest.approx(20 / 8, abs=1e-6)
    offload = ParallelConfig(zero_stage=3, offload_optimizer=True, offload_params=True)
    assert states(offload) == pytest.approx(6 / 8, abs=1e-6)
    tp2 = ParallelConfig(zero_stage=1, tensor_parallel=2)
    assert states(tp2, world=8, tp=2) == pytest.approx((8 + 12 / 4) / 2, abs=1e-6)


def test_apply_ac_blocks_checkpoints_the_first_blocks_from_outside():
    """The first k blocks recompute their forward in backward; the loss, every gradient and
    every parameter name equal those of the same model without checkpointing."""
    import torch

    from models import GPT
    from trainer.worker.parallel import apply_ac_blocks

    shape = dict(vocab_size=97, block_size=32, n_layer=3, n_head=4, d_model=32)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for k in (0, 2):
        torch.manual_seed(1)
        model = GPT(GPTConfig(**shape))  # activation_checkpointing "auto": nothing by itself
        names = [n for n, _ in model.named_parameters()]
        apply_ac_blocks(model, k)
        assert [n for n, _ in model.named_parameters()] == names
        calls = [0] * 3

        def count(i, *_, calls=calls):
            calls[i] += 1

        for i, block in enumerate(model.blocks):
            block.ln_1.register_forward_hook(functools.partial(count, i))
        _, loss = model(idx, torch.roll(idx, -1, 1))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        assert calls == ([2, 2, 1] if k else [1, 1, 1]), calls  # recomputed in backward
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_plan_ac_decides_only_auto_and_says_so_in_one_line():
    from trainer.worker.parallel import apply_ac, plan_ac

    sizes = dict(micro_batch=8, seq_len=256, loss_chunk=4096, device_type="cpu")
    layout = make_layout(1, 1, 1)
    for value in (True, False):
        m = GPTConfig(activation_checkpointing=value)
        assert plan_ac(m, ParallelConfig(), BF16, layout, **sizes) == (0, None)
    blocks, line = plan_ac(GPTConfig(), ParallelConfig(), BF16, layout, **sizes)
    assert blocks == 0  # gpt-tiny's 0.4 GiB fits any host this runs on
    assert line.startswith("activation checkpointing auto: 0 of 6 blocks") and "cpu" in line
    # a pipeline checkpoints every layer when auto chose any block
    pp = ParallelConfig(zero_stage=1, pipeline_parallel=2)
    assert apply_ac(GPTConfig(), pp, make_layout(2, 1, 2), 0) == {}
    assert apply_ac(GPTConfig(), pp, make_layout(2, 1, 2), 3) == {
        "pipeline": {"activation_checkpoint_interval": 1}
    }
