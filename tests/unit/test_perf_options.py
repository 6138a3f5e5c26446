"""Performance options: optim.fused, trainer.compile and trainer.contiguous_weight_grad compose
as config fields and are refused where they do not apply. That they train the same numbers as
the defaults on real DeepSpeed engines: tests/dist/test_perf_engines.py."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, OptimConfig, TrainerConfig, load_config


def test_fields_default_auto_off_on_the_cpu_and_compose():
    # "auto": on CUDA only (tests/unit/test_gpu_defaults.py); the CPU runs as before
    assert OptimConfig().fused == "auto" and TrainerConfig().compile == "auto"
    assert OptimConfig().fused_on("cpu") is False
    cfg = load_config(["optim.fused=true", "trainer.compile=true", "parallel=ddp"])
    assert cfg.optim.fused is True and cfg.trainer.compile is True
    defaults = load_config([])
    assert defaults.optim.fused == "auto" and defaults.trainer.compile == "auto"
    assert load_config(["optim.fused=false", "trainer.compile=false"]).trainer.compile is False
    # on the default layout (each layout it does not apply to is refused below)
    assert load_config(["trainer.contiguous_weight_grad=true"]).trainer.contiguous_weight_grad


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel=pp2", "cluster.num_workers=2", "cluster.cpus_per_worker=1"],
        ["parallel=tp2", "cluster.num_workers=2", "cluster.cpus_per_worker=1"],
        ["parallel=zero3"],
    ],
)
def test_compile_is_refused_where_it_is_not_supported(overrides):
    with pytest.raises(ConfigError, match="trainer.compile") as e:
        load_config(["trainer.compile=true", *overrides])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel=pp2", "cluster.num_workers=2", "cluster.cpus_per_worker=1"],
        ["parallel=tp2", "cluster.num_workers=2", "cluster.cpus_per_worker=1"],
        ["parallel=zero3"],
        ["cluster.gpus_per_worker=1"],
    ],
)
def test_contiguous_weight_grad_is_refused_where_it_does_not_apply(overrides):
    with pytest.raises(ConfigError, match="trainer.contiguous_weight_grad") as e:
        load_config(["trainer.contiguous_weight_grad=true", *overrides])
    assert "\n" not in str(e.value)
