"""cluster.launch.worker_env: what every training worker's process starts with, and the
allocator it preloads (cluster.allocator). That the preloaded tcmalloc serves torch in a fresh
process: tests/dist/test_allocator_preload.py."""

from __future__ import annotations

import pytest

from cluster import launch
from cluster.config import ClusterConfig, ClusterError
from cluster.launch import preload_for, worker_env
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
