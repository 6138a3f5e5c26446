"""cluster.launch and cluster.cpus_per_worker=0: which runs start Ray, how local workers share
the cores, and cluster.fit's in-process worker (its context and restarts)."""

from __future__ import annotations

import os

import pytest

from cluster.config import ClusterConfig
from cluster.inprocess import preload_missing
from trainer.config import ConfigError, load_config


def test_one_local_worker_runs_in_process_and_the_rest_on_ray() -> None:
    assert ClusterConfig(num_workers=1).in_process
    assert not ClusterConfig(num_workers=2).in_process
    assert not ClusterConfig(num_workers=1, address="auto").in_process
    assert not ClusterConfig(num_workers=1, launch="ray").in_process
    assert ClusterConfig(num_workers=1, launch="process").in_process


@pytest.mark.parametrize(
    "kwargs", [dict(num_workers=2, launch="process"), dict(address="auto", launch="process")]
)
def test_launch_process_needs_one_local_worker(kwargs) -> None:
    with pytest.raises(ValueError, match="launch 'process'.*needs address null and num_workers 1"):
        ClusterConfig(**kwargs)


def test_an_unknown_launch_is_refused_from_the_command_line() -> None:
    with pytest.raises(ConfigError, match="launch \\('thread'\\) must be one of"):
        load_config(["cluster.launch=thread"])


def test_local_workers_share_the_cores_by_default() -> None:
    cores = os.cpu_count() or 1
    one = load_config(["cluster.num_workers=1"]).cluster
    assert one.cpus_per_worker == cores and one.threads_per_worker == cores
    two = ClusterConfig(num_workers=2)
    assert two.cpus_per_worker == max(1, cores // 2)
    assert ClusterConfig(num_workers=1, address="auto").cpus_per_worker == 1.0  # joined: 1
    assert ClusterConfig(num_workers=1, cpus_per_worker=1.0).threads_per_worker == 1
    with pytest.raises(ValueError, match="cpus_per_worker \\(-1.0\\) must be > 0, or 0"):
        ClusterConfig(cpus_per_worker=-1.0)


def test_the_allocator_is_preloaded_by_restarting_only_when_missing() -> None:
    assert preload_missing(ClusterConfig(allocator="glibc"), env={}) is None
    lib = "libtcmalloc_minimal.so.4"
    import cluster.launch as launch

    original = launch.find_tcmalloc
    launch.find_tcmalloc = lambda: lib  # a machine that has it (this one may not)
    try:
        assert preload_missing(ClusterConfig(allocator="auto"), env={}) == lib
        assert preload_missing(ClusterConfig(allocator="auto"), env={"LD_PRELOAD": lib}) is None
    finally:
        launch.find_tcmalloc = original


def test_fit_runs_the_one_local_worker_here_and_restarts_it_after_a_failure() -> None:
    from cluster.fit import FitOptions, fit

    calls = []

    def worker(payload, context):
        calls.append((payload, context.rank, context.world_size, context.stop_requested()))
        if len(calls) < 3:
            raise RuntimeError(f"failure {len(calls)}")

    cluster = ClusterConfig(num_workers=1, max_failures=2)
    fit(worker, {"x": 1}, FitOptions(cluster, "unused"))
    assert calls == [({"x": 1}, 0, 1, None)] * 3
    calls.clear()
    with pytest.raises(RuntimeError, match="failure 2"):
        fit(worker, {"x": 1}, FitOptions(ClusterConfig(num_workers=1, max_failures=1), "unused"))
