"""Pure pieces of trainer/: the DeepSpeed config per layout, the optimizer and LR schedule,
error lines."""

from __future__ import annotations

import math

import pytest
import torch

from models.gpt import GPTConfig
from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig
from trainer.driver.errors import explain
from trainer.worker.engine import deepspeed_config, merge_config
from trainer.worker.optimizer import OPTIMIZERS, build_optimizer, param_groups
from trainer.worker.parallel import (
    apply_ac,
    apply_compile,
    apply_tp,
    make_layout,
    tensor_parallel_config,
)
from trainer.worker.schedule import build_scheduler, lr_at


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_stage(stage):
    cfg = deepspeed_config(
        GPTConfig(),
        ParallelConfig(zero_stage=stage),
        PrecisionConfig(name="bf16", bf16=True),
        OptimConfig(grad_clip=0.5),
        layout=make_layout(2, 1, 1),
        micro_batch=4,
        grad_accum=3,
    )
    assert cfg["train_batch_size"] == 24
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert ("stage3_param_persistence_threshold" in cfg["zero_optimization"]) == (stage == 3)


def test_deepspeed_config_offload_and_fp16():
    cfg = deepspeed_config(
        GPTConfig(),
        ParallelConfig(zero_stage=3, offload_optimizer=True, offload_params=True),
        PrecisionConfig(name="fp16", fp16=True, initial_scale_power=12),
        OptimConfig(),
        layout=make_layout(1, 1, 1),
        micro_batch=1,
        grad_accum=1,
    )
    z = cfg["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}


def test_weight_decay_only_on_matrices():
    from models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64, block_size=16))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["params"]
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["params"]
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_layout_fragments_merge_into_one_config():
    def config(parallel=ParallelConfig(), model=GPTConfig(), *, world=2, tp=1, pp=1):
        return deepspeed_config(
            model,
            parallel,
            PrecisionConfig(name="bf16", bf16=True),
            OptimConfig(),
            layout=make_layout(world, tp, pp),
            micro_batch=2,
            grad_accum=3,
        )

    dp = config()
    assert dp["train_batch_size"] == 12 and "tensor_parallel" not in dp and "pipeline" not in dp
    tp = config(ParallelConfig(tensor_parallel=2), world=4, tp=2)
    # apply_tp drops the global batch (DeepSpeed derives it) and adds the AutoTP specs.
    assert "train_batch_size" not in tp and tp["tensor_parallel"] == tensor_parallel_config(2)
    assert tp["gradient_accumulation_steps"] == 3 and tp["zero_optimization"]["stage"] == 2
    pp = ParallelConfig(pipeline_parallel=2, zero_stage=1)
    assert "pipeline" not in config(pp, pp=2)  # no activation checkpointing
    ac = GPTConfig(activation_checkpointing=True)
    assert config(pp, ac, pp=2)["pipeline"] == {"activation_checkpoint_interval": 1}
    every2 = ParallelConfig(pipeline_parallel=2, zero_stage=1, pipeline_checkpoint_interval=2)
    assert config(every2, pp=2)["pipeline"] == {"activation_checkpoint_interval": 2}
    # Without a pipeline the GPT checkpoints its own blocks: no DeepSpeed key.
    assert apply_ac(ac, ParallelConfig(), make_layout(2, 1, 1)) == {}
    assert apply_tp(make_layout(2, 1, 1)) == {}


def test_merge_config_later_fragments_win_and_none_removes():
    merged = merge_config({"a": 1, "b": 2}, {"b": 3, "c": 4}, {"a": None, "x": None})
    assert merged == {"b": 3, "c": 4}


def test_apply_compile_compiles_each_block_in_place_only_when_asked():
    from models.gpt import GPT

    model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, block_size=16))
    names = [n for n, _ in model.named_parameters()]
    assert apply_compile(model, False) is model
    assert all(block._compiled_call_impl is None for block in model.blocks)
    assert apply_compile(model, True) is model
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their keys


def test_every_registered_optimizer_is_a_name_the_config_accepts():
    for name in OPTIMIZERS:
        assert OptimConfig(name=name).name == name
    with pytest.raises(ValueError, match="name \\('sgd'\\)"):
        OptimConfig(name="sgd")
    assert "sgd" not in OPTIMIZERS


def test_build_optimizer_follows_the_optim_config():
    from models.gpt import GPT

    model = GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64, block_size=16))
    o = OptimConfig(lr=3e-4, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.05)
    opt = build_optimizer(model, o)
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6
        assert g["fused"] is None
    assert build_optimizer(model, OptimConfig(fused=True)).param_groups[0]["fused"] is True


def test_scheduler_sets_the_lr_of_every_group_to_lr_at():
    from models.gpt import GPT

    model = GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64, block_size=16))
    o = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    opt = build_optimizer(model, o)
    scheduler = build_scheduler(opt, o, 110)
    for step in (1, 10, 60, 110, 500):
        assert scheduler.step(step) == lr_at(step, o, 110)
        assert all(g["lr"] == lr_at(step, o, 110) for g in opt.param_groups)


def test_lr_schedule_warmup_cosine_floor():
    o = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(1, o, 110) == pytest.approx(0.1)
    assert lr_at(10, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, o, 110) == pytest.approx(0.1)
    assert lr_at(500, o, 110) == pytest.approx(0.1)  # past the end: the floor
    lrs = [lr_at(s, o, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "cosine decay must not increase"


def test_lr_schedule_linear_and_constant():
    lin = OptimConfig(lr=2.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert lr_at(50, lin, 100) == pytest.approx(1.0)
    const = OptimConfig(lr=2.0, warmup_steps=5, schedule="constant")
    assert lr_at(3, const, 100) == pytest.approx(1.2) and lr_at(99, const, 100) == 2.0


def test_explain_reaches_the_root_cause():
    try:
        try:
            raise KeyError("seed")
        except KeyError as inner:
            raise RuntimeError("Training failed due to worker errors:\n...") from inner
    except RuntimeError as e:
        assert explain(e) == "KeyError: 'seed'"


def test_measured_peak_is_cached(tmp_path, monkeypatch):
    from trainer.worker.observability import metrics

    monkeypatch.setenv("RAYGPT_CACHE", str(tmp_path))
    first = metrics.measure_matmul_flops("fp32", 1, seconds=0.05)
    assert first > 1e8
    assert (tmp_path / "peak.json").is_file()
    assert metrics.measure_matmul_flops("fp32", 1, seconds=0.05) == first  # from the cache
    assert metrics.peak_flops_per_worker("bf16", 1, configured=123.0) == 123.0


def test_a_peak_measured_on_a_busy_machine_is_raised_to_fewer_threads_peak(tmp_path, monkeypatch):
    import json
    import os
    import platform

    from trainer.worker.observability import metrics

    monkeypatch.setenv("RAYGPT_CACHE", str(tmp_path))
    node = f"{platform.node()}|{platform.processor()}|{os.cpu_count()}"
    (tmp_path / "peak.json").write_text(
        json.dumps({f"{node}|1|fp32|n2048x3": 26e9, f"{node}|2|fp32|n2048x3": 11e9})
    )
    assert metrics.measure_matmul_flops("fp32", 2) == 26e9  # not the busy 11e9
    assert metrics.measure_matmul_flops("fp32", 1) == 26e9


def test_throughput_excludes_paused_time():
    import time

    from trainer.worker.observability.metrics import Throughput

    meter = Throughput(tokens_per_step=1000, flops_per_token=6.0, peak_flops_total=1e9)
    time.sleep(0.05)
    meter.step()
    with meter.paused():
        time.sleep(0.2)  # an eval: must not dilute tokens/s
    lap = meter.lap()
    assert lap["step_time_s"] < 0.15
    assert lap["tokens_per_sec"] > 1000 / 0.15


def test_deepspeed_config_nvme_offload():
    p = ParallelConfig(
        zero_stage=3,
        offload_optimizer=True,
        offload_params=True,
        offload_device="nvme",
        nvme_path="/scratch/x",
        sub_group_size=5_000_000,
    )
    zero = deepspeed_config(
        GPTConfig(),
        p,
        PrecisionConfig(name="bf16", bf16=True),
        OptimConfig(),
        layout=make_layout(2, 1, 1),
        micro_batch=1,
        grad_accum=1,
    )["zero_optimization"]
    for key in ("offload_optimizer", "offload_param"):
        assert zero[key]["device"] == "nvme" and zero[key]["nvme_path"] == "/scratch/x"
    assert zero["sub_group_size"] == 5_000_000


def test_nvme_offload_without_libaio_is_one_line_before_ray(monkeypatch, tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from trainer.config import ConfigError, load_config
    from trainer.driver.preflight import check_offload

    cfg = load_config(["parallel=zero3-nvme", f"parallel.nvme_path={tmp_path / 'nv'}"])
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    with pytest.raises(ConfigError, match="install libaio-dev") as e:
        check_offload(cfg)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: True)
    check_offload(cfg)  # with the op, a writable path passes ...
    assert not (tmp_path / "nv").exists()  # ... and the check creates nothing
    (tmp_path / "file").write_text("")
    bad = load_config(["parallel=zero3-nvme", f"parallel.nvme_path={tmp_path / 'file' / 'x'}"])
    with pytest.raises(
        ConfigError, match=r"parallel.nvme_path \(.*file/x\): .*file exists and is not a directory"
    ):
        check_offload(bad)
