"""cluster.launch.worker_env: what every training worker's process starts with, and the
allocator it preloads (cluster.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster import launch
from cluster.config import ClusterConfig
from cluster.launch import find_tcmalloc, preload_for, worker_env
from cluster.config import ClusterError
from trainer.config import ConfigError, load_config


def test_threads_and_accelerator():
    env = worker_env(ClusterConfig(cpus_per_worker=2.0, allocator="glibc"))
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["DS_ACCELERATOR"] == "cpu"
    assert "LD_PRELOAD" not in env


def test_allocator_choices(monkeypatch):
    monkeypatch.setattr(launch, "find_tcmalloc", lambda: None)
    assert preload_for(ClusterConfig(allocator="auto")) is None  # auto without one: glibc
    with pytest.raises(ClusterError, match="cluster.allocator=tcmalloc") as e:
        preload_for(ClusterConfig(allocator="tcmalloc"))
    assert "\n" not in str(e.value)
    monkeypatch.setattr(launch, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setenv("LD_PRELOAD", "libmine.so")
    env = worker_env(ClusterConfig(allocator="auto"))
    assert env["LD_PRELOAD"] == "libmine.so libtcmalloc_minimal.so.4"  # the user's stays first
    assert "LD_PRELOAD" not in worker_env(ClusterConfig(allocator="glibc"))


def test_cluster_groups_choose_and_bad_names_are_refused():
    assert load_config([]).cluster.allocator == "auto"
    ray = load_config(["cluster=ray", "trainer.global_batch_size=64"]).cluster
    assert ray.allocator == "glibc"
    with pytest.raises(ConfigError, match="allocator \\('jemalloc'\\) must be one of"):
        load_config(["cluster.allocator=jemalloc"])


@pytest.mark.skipif(find_tcmalloc() is None, reason="no tcmalloc here (libtcmalloc-minimal4)")
def test_the_preloaded_tcmalloc_serves_torch():
    env = {**os.environ, "LD_PRELOAD": find_tcmalloc()}
    code = (
        "import torch; x = torch.ones(1 << 24).sum().item(); "
        "print([l.split()[-1] for l in open('/proc/self/maps') if 'tcmalloc' in l][:1], x)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tcmalloc" in out.stdout and str(float(1 << 24)) in out.stdout, out.stdout
