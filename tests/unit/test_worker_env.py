"""cluster.launch.worker_env: what every training worker's process starts with, and the
allocator it preloads (cluster.allocator). That the preloaded tcmalloc serves torch in a fresh
process: tests/dist/test_allocator_preload.py."""

from __future__ import annotations

import os

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


def test_worker_log_noise_is_dropped_and_everything_else_printed(monkeypatch):
    """The one handler Ray prints worker output with is replaced by a filter of the NOISE
    lines (cluster/ray_private.py) in front of the same printer."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from cluster import ray_private

    printed = []
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", None)])
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, **kw: printed.append(data))
    ray_private.drop_noise_from_worker_logs()
    noise = (
        "[2026-11-28 05:14:28,984 E 705 1219] core_worker.cc:2465: Actor with class name: "
        "'PreemptionWatcher' and ID: '4267b85309413bd0f0f1af4b01000000' has constructor "
        "arguments in the object store and max_restarts > 0. If the arguments in the object "
        "store go out of scope or are lost, the actor restart will fail."
    )
    dispatcher.emit({"pid": 7, "is_err": True, "lines": [noise, "step 1 loss 5.0"]})
    dispatcher.emit({"pid": 7, "is_err": True, "lines": [noise]})
    dispatcher.emit({"pid": 8, "is_err": False, "lines": ["an actor failed: ERROR"]})
    assert [d["lines"] for d in printed] == [["step 1 loss 5.0"], ["an actor failed: ERROR"]]
    assert printed[0]["pid"] == 7 and printed[0]["is_err"] is True


def test_token_auth_is_switched_on_as_ray_would_and_an_explicit_mode_kept(monkeypatch):
    from ray._private.authentication import authentication_token_setup as setup

    from cluster import ray_private

    switched = []
    monkeypatch.setattr(setup, "_enable_token_auth", lambda: switched.append(True))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    ray_private.settle_token_auth()
    assert switched == [True]  # Ray's own switch (env + its cached config)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray_private.settle_token_auth()
    assert switched == [True] and os.environ["RAY_AUTH_MODE"] == "disabled"


def test_a_joined_cluster_gets_the_job_env_but_not_what_a_submitted_job_has(monkeypatch):
    """Every process of the job on a joined cluster (Ray Train's controller too) gets the
    object-store settings; under `ray job submit` those the job's runtime env already has are
    left out (Ray refuses to merge the same keys)."""
    import json

    import ray
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from cluster import ray_private

    for var in ("RAY_DEDUP_LOGS", "RAY_COLOR_PREFIX", "RAY_TRAIN_ENABLE_PRINT_PATCH"):
        monkeypatch.setenv(var, "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    asked = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: asked.append(kw))
    monkeypatch.setattr(ray_private, "drop_noise_from_worker_logs", lambda: None)
    joined = ClusterConfig(address="127.0.0.1:6379")
    env = {"AWS_ENDPOINT_URL": "http://store:9000", "AWS_DEFAULT_REGION": "eu-west-1"}

    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert launch.connect(joined, job_env=env) is False
    assert asked[-1]["runtime_env"] == {"env_vars": env}

    job = {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://given:1"}}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(job))
    assert ray_private.job_env_vars() == {"AWS_ENDPOINT_URL": "http://given:1"}
    launch.connect(joined, job_env=env)
    assert asked[-1]["runtime_env"] == {"env_vars": {"AWS_DEFAULT_REGION": "eu-west-1"}}
    launch.connect(joined, job_env={"AWS_ENDPOINT_URL": "http://store:9000"})
    assert asked[-1]["runtime_env"] is None  # nothing left to add
