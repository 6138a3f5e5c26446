"""Driver preflight: storage and shared-path checks refuse bad locations in one line and
leave everything as it was."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import pytest

from trainer.config import ConfigError, load_config
from trainer.driver import preflight


def _cfg(tmp_path, *extra):
    return load_config(
        [
            "+experiment=smoke",
            f"run.root={tmp_path / 'runs'}",
            f"data.out_dir={tmp_path / 'd'}",
            "run.name=r",
            *extra,
        ]
    )


def test_writable_local_locations_pass_and_nothing_is_created(tmp_path):
    cfg = _cfg(tmp_path)
    preflight.check_storage(cfg)
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_run_root_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cfg = load_config(
        [
            "+experiment=smoke",
            f"run.root={ro / 'runs'}",
            "run.name=r",
            f"data.out_dir={tmp_path / 'd'}",
        ]
    )
    with pytest.raises(ConfigError, match=r"run.root \(.*\): .* is not writable"):
        preflight.check_storage(cfg)


def test_a_run_root_under_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    cfg = load_config(
        [
            "+experiment=smoke",
            f"run.root={tmp_path / 'f' / 'runs'}",
            "run.name=r",
            f"data.out_dir={tmp_path / 'd'}",
        ]
    )
    with pytest.raises(ConfigError) as e:
        preflight.check_storage(cfg)
    assert str(e.value).startswith(f"run.root ({tmp_path / 'f' / 'runs'}): ")
    assert "is not a directory" in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "f").read_text() == "x"


def test_an_unsupported_scheme_is_one_line(tmp_path):
    cfg = _cfg(tmp_path, "run.root=hdfs://nn/runs")
    with pytest.raises(ConfigError, match=r"run.root \(hdfs://nn/runs\): scheme 'hdfs://' is not"):
        preflight.check_storage(cfg)


def test_a_local_path_some_node_cannot_see_is_refused(tmp_path, monkeypatch):
    import cluster.launch

    cfg = _cfg(
        tmp_path, "cluster=ray", "cluster.address=127.0.0.1:1", "trainer.global_batch_size=64"
    )
    seen = {}

    def fake_every_node(fn, path, token):  # node 1 runs the real check, node 2 sees nothing
        seen["probe"] = path
        return {"node-a" * 4: fn(path, token), "node-b" * 4: False}

    monkeypatch.setattr(cluster.launch, "run_on_every_node", fake_every_node)
    with pytest.raises(ConfigError) as e:
        preflight.check_shared_paths(cfg)
    msg = str(e.value)
    assert msg.startswith(f"run.root ({tmp_path / 'runs'}) is a local path that 1 of 2 Ray nodes")
    assert "s3://" in msg and "\n" not in msg
    assert not os.path.exists(seen["probe"])  # the probe file is gone again
    assert sorted(os.listdir(tmp_path)) == []


def test_a_local_path_every_node_sees_passes(tmp_path, monkeypatch):
    import cluster.launch

    cfg = _cfg(
        tmp_path, "cluster=ray", "cluster.address=127.0.0.1:1", "trainer.global_batch_size=64"
    )
    monkeypatch.setattr(
        cluster.launch, "run_on_every_node", lambda fn, *a: {"n1": fn(*a), "n2": fn(*a)}
    )
    preflight.check_shared_paths(cfg)
    assert sorted(os.listdir(tmp_path)) == []


def test_bf16_on_a_cpu_without_native_bf16_gets_one_warning_line(capsys):
    """Local CPU workers in bf16 on an AVX2-only CPU: one warning naming the faster choice;
    nothing for fp32, for a CPU with AMX / AVX512-BF16, for GPUs or for a joined cluster."""
    from trainer.config import load_config
    from trainer.driver.preflight import warn_slow_cpu_bf16

    avx2 = {"fpu", "sse2", "avx2", "fma"}
    cfg = load_config(["precision=bf16"])
    warn_slow_cpu_bf16(cfg, flags=avx2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: precision=bf16 on this CPU")
    assert "precision=fp32" in err[0]
    joined = [
        "precision=bf16",
        "cluster=ray",
        "cluster.address=x:1",
        "trainer.global_batch_size=64",
    ]
    for config, flags in [
        (load_config(["precision=fp32"]), avx2),
        (cfg, avx2 | {"amx_bf16"}),
        (cfg, avx2 | {"avx512_bf16"}),
        (load_config(joined), avx2),
    ]:
        warn_slow_cpu_bf16(config, flags=flags)
        assert capsys.readouterr().err == "", (config.precision, config.cluster, flags)
    gpu = dataclasses.replace(cfg.cluster, gpus_per_worker=1.0)
    warn_slow_cpu_bf16(SimpleNamespace(cluster=gpu, precision=cfg.precision), flags=avx2)
    assert capsys.readouterr().err == ""
