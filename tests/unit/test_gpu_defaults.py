"""The GPU defaults (issue 20): "auto" settings that take Hopper-minded values on CUDA and
leave the CPU exactly as it ran before. Checked on the DeepSpeed config fragments and the
optimizer deepspeed_config and build_optimizer make for a CUDA and a CPU accelerator (the
device type is a string here: no GPU needed). Whether each pays on a GPU is the A/B that
bench/README.md ("GPU defaults") waits for."""

from __future__ import annotations

import pytest
import torch

from models.config import GPTConfig
from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig, TrainerConfig
from trainer.layout import make_layout
from trainer.worker.engine import deepspeed_config, use_tf32
from trainer.worker.optimizer import build_optimizer
from trainer.worker.parallel import compile_on

BF16, FP32 = PrecisionConfig(name="bf16", bf16=True), PrecisionConfig(name="fp32")


def ds(stage: int, device: str, precision=BF16, pp: int = 1, **parallel) -> dict:
    par = ParallelConfig(zero_stage=stage, pipeline_parallel=pp, **parallel)
    return deepspeed_config(
        GPTConfig(),
        par,
        precision,
        OptimConfig(),
        layout=make_layout(2 * pp, 1, pp),
        micro_batch=2,
        grad_accum=1,
        device_type=device,
    )


# What raygpt ran before these defaults, on every device; the CPU keeps it.
BEFORE = dict(
    overlap_comm=False,
    reduce_bucket_size=50_000_000,
    allgather_bucket_size=50_000_000,
)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cuda_zero_overlaps_with_deepspeeds_buckets_the_cpu_as_before(stage):
    cuda, cpu = ds(stage, "cuda")["zero_optimization"], ds(stage, "cpu")["zero_optimization"]
    assert cuda["overlap_comm"] is True
    assert cuda["reduce_bucket_size"] == cuda["allgather_bucket_size"] == 500_000_000
    assert {k: cpu[k] for k in BEFORE} == BEFORE
    if stage == 3:
        # biases and norms (< 1e5 elements) stay whole on CUDA; the CPU gathers every one
        assert cuda["stage3_param_persistence_threshold"] == 100_000
        assert cpu["stage3_param_persistence_threshold"] == 0
        assert cuda["stage3_prefetch_bucket_size"] == cpu["stage3_prefetch_bucket_size"] == 5e7
    else:
        assert "stage3_param_persistence_threshold" not in cuda


def test_a_setting_given_wins_on_cuda():
    given = dict(
        overlap_comm=False,
        reduce_bucket_size=1_000_000,
        allgather_bucket_size=2_000_000,
        param_persistence_threshold=0,
        prefetch_bucket_size=3_000_000,
    )
    z = ds(3, "cuda", **given)["zero_optimization"]
    assert z["overlap_comm"] is False and z["reduce_bucket_size"] == 1_000_000
    assert z["allgather_bucket_size"] == 2_000_000
    assert z["stage3_param_persistence_threshold"] == 0
    assert z["stage3_prefetch_bucket_size"] == 3_000_000
    assert ds(2, "cpu", overlap_comm=True)["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp32_gradient_accumulation_under_bf16_on_cuda_at_zero_1_and_2(stage):
    # DeepSpeed 0.19: ZeRO-1 switches to its BF16_Optimizer, ZeRO-2 accumulates in a separate
    # fp32 buffer, ZeRO-0 raises NotImplementedError on the key, ZeRO-3 ignores it.
    want = {"grad_accum_dtype": "fp32"} if stage in (1, 2) else None
    assert ds(stage, "cuda").get("data_types") == want
    assert "data_types" not in ds(stage, "cpu")  # the CPU accumulates as before
    assert "data_types" not in ds(stage, "cuda", precision=FP32)  # fp32 already
    off = PrecisionConfig(name="bf16", bf16=True, fp32_grad_accum=False)
    assert "data_types" not in ds(stage, "cuda", precision=off)


def test_pipelines_keep_their_bf16_zero_1_optimizer():
    assert "data_types" not in ds(1, "cuda", pp=2)


def test_adamw_is_fused_on_cuda_and_not_on_the_cpu():
    from models.gpt import GPT

    model = GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64, block_size=16))
    assert OptimConfig().fused == "auto"
    assert build_optimizer(model, OptimConfig(), "cuda").param_groups[0]["fused"] is True
    assert build_optimizer(model, OptimConfig(), "cpu").param_groups[0]["fused"] is None
    assert build_optimizer(model, OptimConfig(fused=False), "cuda").param_groups[0]["fused"] is None
    assert build_optimizer(model, OptimConfig(fused=True), "cpu").param_groups[0]["fused"] is True


def test_compile_auto_only_on_cuda_with_data_parallelism_at_zero_0_to_2():
    assert TrainerConfig().compile == "auto"
    dp = make_layout(2, 1, 1)
    for stage in (0, 1, 2):
        assert compile_on("auto", "cuda", dp, ParallelConfig(zero_stage=stage)) is True
        assert compile_on("auto", "cpu", dp, ParallelConfig(zero_stage=stage)) is False
    assert compile_on("auto", "cuda", dp, ParallelConfig(zero_stage=3)) is False
    tp = ParallelConfig(zero_stage=1, tensor_parallel=2)
    assert compile_on("auto", "cuda", make_layout(2, 2, 1), tp) is False
    pp = ParallelConfig(zero_stage=1, pipeline_parallel=2)
    assert compile_on("auto", "cuda", make_layout(2, 1, 2), pp) is False
    assert compile_on(True, "cpu", dp, ParallelConfig()) is True
    assert compile_on(False, "cuda", dp, ParallelConfig()) is False


def test_tf32_only_on_cuda():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        use_tf32(BF16, "cpu")
        assert torch.get_float32_matmul_precision() == "highest"
        use_tf32(PrecisionConfig(tf32=False), "cuda")
        assert torch.get_float32_matmul_precision() == "highest"
        use_tf32(FP32, "cuda")
        assert torch.get_float32_matmul_precision() == "high"  # TF32
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("key", ["optim.fused", "parallel.overlap_comm", "trainer.compile"])
def test_auto_settings_take_true_false_auto_and_refuse_the_rest(key):
    from trainer.config import ConfigError, load_config

    for value, want in (("true", True), ("false", False), ("auto", "auto")):
        cfg = load_config([f"{key}={value}", "parallel=ddp"])
        group, field = key.split(".")
        assert getattr(getattr(cfg, group), field) == want
    with pytest.raises(ConfigError, match=rf"{key.split('.')[1]} \('sometimes'\) must be true"):
        load_config([f"{key}=sometimes"])
