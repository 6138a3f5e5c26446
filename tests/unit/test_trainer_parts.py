"""Pure pieces of trainer/: the DeepSpeed config per layout, the LR schedule, error lines."""

from __future__ import annotations

import math

import pytest

from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig
from trainer.driver.errors import explain
from trainer.worker.engine import deepspeed_config, param_groups
from trainer.worker.schedule import lr_at


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_stage(stage):
    cfg = deepspeed_config(
        ParallelConfig(zero_stage=stage),
        PrecisionConfig(bf16=True),
        OptimConfig(grad_clip=0.5),
        micro_batch=4,
        grad_accum=3,
        dp_size=2,
    )
    assert cfg["train_batch_size"] == 24
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert ("stage3_param_persistence_threshold" in cfg["zero_optimization"]) == (stage == 3)


def test_deepspeed_config_offload_and_fp16():
    cfg = deepspeed_config(
        ParallelConfig(zero_stage=3, offload_optimizer=True, offload_params=True),
        PrecisionConfig(bf16=False, fp16=True, initial_scale_power=12),
        OptimConfig(),
        micro_batch=1,
        grad_accum=1,
        dp_size=1,
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
        p, PrecisionConfig(), OptimConfig(), micro_batch=1, grad_accum=1, dp_size=2
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
