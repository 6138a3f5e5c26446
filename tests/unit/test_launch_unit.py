"""cluster.launch and cluster.cpus_per_worker=0: which runs start Ray, how local workers share
the cores, and the in-process worker's checkpoint registration (Ray's snapshot format)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cluster import ray_private
from cluster.config import ClusterConfig
from cluster.inprocess import preload_missing
from cluster.worker_context import ProcessContext
from trainer.checkpoint import latest
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


def _local_checkpoint(tmp: Path, step: int) -> Path:
    d = tmp / f"local-{step}"
    d.mkdir()
    (d / "trainer_state.json").write_text(f'{{"step": {step}}}')
    return d


@pytest.mark.parametrize("asynchronous", [False, True])
def test_in_process_checkpoints_are_registered_as_ray_registers_them(tmp_path, asynchronous):
    run = tmp_path / "run"
    ctx = ProcessContext(str(run), keep_last=2, resume_point=lambda: latest.resume_point(str(run)))
    events = []
    for step in (1, 2, 3):
        local = _local_checkpoint(tmp_path, step)
        name = f"checkpoint_{step:08d}"
        events.append(
            ctx.report_checkpoint({"step": step}, str(local), name, asynchronous=asynchronous)
        )
        if not asynchronous:
            assert events[-1].is_set() and not local.exists()  # moved into the run directory
    ctx.close()
    assert all(isinstance(e, threading.Event) and e.is_set() for e in events)
    names, newest = ray_private.snapshot_checkpoints((run / ray_private.SNAPSHOT_FILE).read_text())
    assert names == ["checkpoint_00000002", "checkpoint_00000003"]
    assert newest == "checkpoint_00000003"
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == names  # the oldest deleted
    assert (run / "checkpoint_00000003" / "trainer_state.json").read_text() == '{"step": 3}'
    # What Ray (and raygpt's resume rule) would resume from:
    assert latest.resume_point(str(run)) == str(run / "checkpoint_00000003")
    with ctx.resume_checkpoint() as found:
        assert found is not None and found[1] == run / "checkpoint_00000003"
