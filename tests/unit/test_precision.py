"""precision=auto (trainer/precision.py): the resolution table (CPU flags x CUDA), where it is
resolved (a resume's checkpoint, this machine, a worker node), that explicit values keep their
meaning and that the cross-group rules see the resolved value."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import precision
from trainer.config import ConfigError, PrecisionConfig, load_config

AVX2 = ["fpu", "sse4_2", "avx", "avx2", "fma"]


@pytest.mark.parametrize(
    "hardware, name",
    [
        ({"cuda": False, "cpu_flags": AVX2}, "fp32"),
        ({"cuda": False, "cpu_flags": [*AVX2, "avx512f", "avx512_bf16"]}, "bf16"),
        ({"cuda": False, "cpu_flags": [*AVX2, "amx_tile", "amx_bf16"]}, "bf16"),
        ({"cuda": False, "cpu_flags": [*AVX2, "avx512f", "avx512_fp16"]}, "fp32"),
        ({"cuda": False, "cpu_flags": None}, "fp32"),  # unreadable: never guess bf16
        ({"cuda": True, "cuda_bf16": True, "gpu": "NVIDIA H100", "cpu_flags": AVX2}, "bf16"),
        ({"cuda": True, "cuda_bf16": False, "gpu": "Tesla V100", "cpu_flags": AVX2}, "fp32"),
        # the GPU decides for GPU workers, not the host CPU's flags
        ({"cuda": True, "cuda_bf16": False, "gpu": "T4", "cpu_flags": ["amx_bf16"]}, "fp32"),
    ],
)
def test_resolution_table(hardware: dict, name: str) -> None:
    chosen, why = precision.choose(hardware)
    assert chosen == name and why
    assert chosen != "fp16"  # never chosen silently


def test_why_names_the_reason() -> None:
    assert "amx_bf16" in precision.choose({"cpu_flags": ["amx_bf16"]})[1]
    assert "precision=fp16" in precision.choose({"cuda": True, "gpu": "Tesla V100"})[1]
    assert "avx512_bf16" in precision.choose({"cpu_flags": AVX2})[1]


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\nbugs\t: x\n")
    assert precision.cpu_flags(str(info)) == {"fpu", "avx2", "amx_bf16"}
    assert precision.cpu_flags(str(tmp_path / "none")) is None


def test_root_config_and_smoke_default_to_auto_and_explicit_values_stay() -> None:
    for overrides in ([], ["+experiment=smoke"]):
        p = load_config(overrides).precision
        assert p.auto and p.name == "auto" and not p.bf16 and not p.fp16
    assert load_config(["precision=auto"]).precision.dtype_name == "auto"
    for name in ("bf16", "fp16", "fp32"):
        p = load_config([f"precision={name}"]).precision
        assert not p.auto and p.dtype_name == name
    with pytest.raises(ValueError, match="name 'auto' with bf16=True"):
        PrecisionConfig(bf16=True)


def _fake_hardware(monkeypatch: pytest.MonkeyPatch, hardware: dict) -> list[bool]:
    seen: list[bool] = []

    def probe(use_gpu: bool) -> dict:
        seen.append(use_gpu)
        return hardware

    monkeypatch.setattr(precision, "probe", probe)
    return seen


def test_local_workers_resolve_here_and_print_once(monkeypatch, tmp_path, capsys) -> None:
    _fake_hardware(monkeypatch, {"cuda": False, "cpu_flags": AVX2})
    cfg = load_config(["+experiment=smoke", f"run.root={tmp_path}", "run.name=r"])
    out = precision.resolve_before_ray(cfg)
    assert out.precision == PrecisionConfig(name="fp32")
    assert out.precision.dtype_name == "fp32" and out.model == cfg.model
    lines = capsys.readouterr().out.splitlines()
    assert lines == [lines[0]] and lines[0].startswith("precision: auto -> fp32 (CPU workers")

    _fake_hardware(monkeypatch, {"cuda": False, "cpu_flags": [*AVX2, "amx_bf16"]})
    out = precision.resolve_before_ray(cfg)
    assert out.precision == PrecisionConfig(name="bf16", bf16=True)


def test_explicit_precision_is_never_resolved(monkeypatch, tmp_path, capsys) -> None:
    seen = _fake_hardware(monkeypatch, {"cuda": False, "cpu_flags": [*AVX2, "amx_bf16"]})
    cfg = load_config(["precision=fp16", f"run.root={tmp_path}", "run.name=r"])
    assert precision.resolve_before_ray(cfg) is cfg
    assert precision.resolve_on_cluster(cfg) is cfg
    assert not seen and capsys.readouterr().out == ""


def test_gpu_or_joined_workers_are_resolved_on_a_worker_node(monkeypatch, tmp_path, capsys):
    """The driver may be a CPU machine submitting to GPU workers: it does not look at its own
    hardware; a Ray task with one worker's resources does (cluster.launch.run_as_worker)."""
    import cluster.launch

    local = _fake_hardware(monkeypatch, {"cuda": False, "cpu_flags": AVX2})  # the driver's
    asked = []

    def run_as_worker(fn, cluster_cfg, *args):
        asked.append((cluster_cfg.gpus_per_worker, args))
        return {"cuda": True, "cuda_bf16": True, "gpu": "NVIDIA H200", "cpu_flags": AVX2}

    monkeypatch.setattr(cluster.launch, "run_as_worker", run_as_worker)
    for extra in (["cluster.gpus_per_worker=1"], ["cluster.address=auto"]):
        cfg = load_config(["+experiment=smoke", f"run.root={tmp_path}", "run.name=g", *extra])
        assert precision.resolve_before_ray(cfg) is cfg  # not resolved on the driver
        out = precision.resolve_on_cluster(cfg)
        assert out.precision.bf16 and out.precision.name == "bf16"
        assert "NVIDIA H200 supports bf16, on a worker node" in capsys.readouterr().out
    assert not local and asked == [(1.0, (True,)), (0.0, (False,))]


def test_a_resume_keeps_the_recorded_precision(monkeypatch, tmp_path, capsys) -> None:
    _fake_hardware(monkeypatch, {"cuda": False, "cpu_flags": AVX2})  # auto would be fp32
    saved = {"precision": {"name": "bf16", "bf16": True, "fp16": False}}
    monkeypatch.setattr(precision, "_resumed_config", lambda cfg: saved)
    cfg = load_config(["+experiment=smoke", f"run.root={tmp_path}", "run.name=r"])
    out = precision.resolve_before_ray(cfg)
    assert out.precision.bf16 and out.precision.name == "bf16"
    assert "auto -> bf16 (kept from the checkpoint" in capsys.readouterr().out
    # told otherwise on the resume command: the explicit value
    told = load_config(
        ["+experiment=smoke", "precision=fp32", f"run.root={tmp_path}", "run.name=r"]
    )
    assert precision.resolve_before_ray(told).precision.dtype_name == "fp32"


@pytest.mark.parametrize(
    "section, name",
    [
        ({"name": "bf16", "bf16": True, "fp16": False}, "bf16"),  # today's and older defaults
        ({"name": "fp16", "bf16": False, "fp16": True}, "fp16"),
        ({"name": "fp32", "bf16": False}, "fp32"),
        ({"name": "auto", "bf16": False, "fp16": False}, None),  # never saved; not trusted
        (None, None),
    ],
)
def test_saved_precision(section, name) -> None:
    assert precision.saved_precision({"precision": section} if section else {}) == name


def test_the_resolved_value_is_validated_again(monkeypatch, tmp_path) -> None:
    """pipeline_parallel with bf16 needs ZeRO-1: auto resolving to bf16 is refused in one line
    as the explicit value is."""
    _fake_hardware(monkeypatch, {"cuda": False, "cpu_flags": ["amx_bf16"]})
    base = ["+experiment=smoke", "parallel=pp2", "parallel.zero_stage=0", f"run.root={tmp_path}"]
    with pytest.raises(ConfigError, match="pipeline_parallel with bf16 needs zero_stage 1"):
        load_config([*base, "precision=bf16"])
    cfg = load_config(base)  # auto: not known yet
    with pytest.raises(ConfigError, match="pipeline_parallel with bf16 needs zero_stage 1"):
        precision.resolve_before_ray(cfg)
