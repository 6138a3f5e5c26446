"""cluster.launch.check_capacity against faked clusters (ray_private's resource readers faked),
and ray_private's reading of the autoscaler's status (no Ray started)."""

from __future__ import annotations

import json
import math

import pytest

from cluster import launch, ray_private
from cluster.config import ClusterConfig, ClusterError

NODE = "node_" + "ab12" * 14  # the read-only provider's name for a hand-started node


def fake(monkeypatch, now: dict, limits: dict | None, nodes: list[dict] | None = None) -> None:
    monkeypatch.setattr(ray_private, "current_resources", lambda: dict(now))
    monkeypatch.setattr(ray_private, "max_resources", lambda: limits)
    monkeypatch.setattr(ray_private, "node_resources", lambda: list(nodes or [now]))


def gpus(n: int, per: float = 1.0) -> ClusterConfig:
    return ClusterConfig(num_workers=n, cpus_per_worker=2.0, gpus_per_worker=per)


def test_fixed_cluster_too_small_is_refused_in_one_line(monkeypatch):
    fake(monkeypatch, {"CPU": 64.0, "GPU": 4.0}, None)
    with pytest.raises(ClusterError) as e:
        launch.check_capacity(gpus(8))
    msg = str(e.value)
    assert "\n" not in msg
    assert "cluster.num_workers (8) needs 16 CPUs and 8 GPUs" in msg
    assert "has 64 CPUs and 4 GPUs" in msg and "autoscaler" not in msg


def test_fixed_cluster_that_fits_passes_quietly(monkeypatch, capsys):
    fake(monkeypatch, {"CPU": 64.0, "GPU": 8.0}, None)
    launch.check_capacity(gpus(8))
    assert capsys.readouterr().out == ""


def test_autoscaler_that_can_add_the_gpus_is_not_refused(monkeypatch, capsys):
    # Only a CPU head is up; the autoscaler can grow the cluster to 16 GPUs.
    fake(monkeypatch, {"CPU": 8.0}, {"CPU": 136.0, "GPU": 16.0})
    launch.check_capacity(gpus(8))
    out = capsys.readouterr().out
    assert "8 GPUs / 16 CPUs requested, 0 / 8 up now: waiting for the autoscaler" in out


def test_autoscaler_limits_too_small_are_refused(monkeypatch):
    fake(monkeypatch, {"CPU": 8.0}, {"CPU": 136.0, "GPU": 4.0})
    with pytest.raises(ClusterError, match=r"its autoscaler can grow it to 136 CPUs and 4 GPUs"):
        launch.check_capacity(gpus(8))


def test_nodes_outside_the_autoscaler_count_too(monkeypatch):
    # Hand-joined GPU nodes are not in the autoscaler's node groups: the larger figure counts.
    fake(monkeypatch, {"CPU": 64.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 0.0})
    launch.check_capacity(gpus(8))


def test_autoscaler_with_unknown_limits_never_refuses(monkeypatch, capsys):
    fake(monkeypatch, {"CPU": 8.0}, {"CPU": math.inf, "GPU": math.inf})
    launch.check_capacity(gpus(64))
    assert "waiting for the autoscaler" in capsys.readouterr().out


def test_one_worker_must_fit_on_one_node(monkeypatch):
    # 8 GPUs in all, but 4 per node: a worker asking for 8 GPUs never gets placed.
    nodes = [{"CPU": 32.0, "GPU": 4.0}, {"CPU": 32.0, "GPU": 4.0}]
    fake(monkeypatch, {"CPU": 64.0, "GPU": 8.0}, None, nodes)
    with pytest.raises(ClusterError, match=r"one worker needs 2 CPUs and 8 GPUs on one node"):
        launch.check_capacity(gpus(1, per=8.0))
    launch.check_capacity(gpus(2, per=4.0))


def _status(mapping: dict[str, str]) -> bytes:
    return json.dumps({"autoscaler_report": {"node_type_mapping": mapping}}).encode()


@pytest.mark.parametrize(
    ("mapping", "can_add"),
    [
        ({"1.2.3.4": NODE, "1.2.3.5": "node_" + "cd34" * 14}, False),  # plain `ray start`
        ({"1.2.3.4": "head", "1.2.3.5": "gpu-worker"}, True),  # `ray up`, KubeRay
        ({}, False),
    ],
)
def test_autoscaler_with_a_node_provider_is_told_from_the_read_only_one(
    monkeypatch, mapping, can_add
):
    import ray.experimental.internal_kv as kv

    monkeypatch.setattr(kv, "_internal_kv_get", lambda key, *a, **k: _status(mapping))
    import ray.autoscaler.v2.utils as v2

    monkeypatch.setattr(v2, "is_autoscaler_v2", lambda **k: False)
    assert ray_private._autoscaler_can_add_nodes() is can_add


def test_max_resources_prefers_reported_limits(monkeypatch):
    monkeypatch.setattr(ray_private, "_reported_limits", lambda: {"CPU": 96.0, "GPU": 8.0})
    assert ray_private.max_resources() == {"CPU": 96.0, "GPU": 8.0}
    monkeypatch.setattr(ray_private, "_reported_limits", lambda: None)
    monkeypatch.setattr(ray_private, "_autoscaler_can_add_nodes", lambda: True)
    assert ray_private.max_resources() == {"CPU": math.inf, "GPU": math.inf}
    monkeypatch.setattr(ray_private, "_autoscaler_can_add_nodes", lambda: False)
    assert ray_private.max_resources() is None


def test_reported_limits_read_ray_trains_source(monkeypatch):
    import sys

    from ray._private import state

    monkeypatch.setattr(
        state.state,
        "get_max_resources_from_cluster_config",
        lambda: {"CPU": 64, "GPU": sys.maxsize},
    )
    assert ray_private._reported_limits() == {"CPU": 64.0, "GPU": math.inf}
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", lambda: None)
    assert ray_private._reported_limits() is None
