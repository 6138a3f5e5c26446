"""Everything raygpt knows about Ray's internals, in one module: the checkpoint snapshot file
Ray Train kept in the run directories of raygpt before its own index (read once to migrate
them: trainer/checkpoint/index.py), the autoscaler's limits, Ray Train's per-report logger,
the token-auth default and the worker-log stream.
A Ray upgrade that changes these breaks here only.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Optional

# Ray Train V2 kept the checkpoints it registered here, in the run directory.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def snapshot_checkpoints(text: str) -> tuple[Optional[list[str]], Optional[str]]:
    """(registered checkpoint dir names or None if it lists none, the latest one or None)
    from the snapshot's text. Raises ValueError when the text is not a readable snapshot."""
    try:
        snap = json.loads(text)
        latest = snap["latest_checkpoint_result"]
        latest = str(latest["checkpoint_dir_name"]) if latest else None
        results = snap.get("checkpoint_results")
        names = None if results is None else [str(r["checkpoint_dir_name"]) for r in results]
        return names, latest
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable {SNAPSHOT_FILE}: {e}") from None


def current_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def node_resources() -> list[dict[str, float]]:
    """The total resources of each alive node."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def max_resources() -> Optional[dict[str, float]]:
    """What an autoscaling cluster can grow to (resource name -> amount), or None when no
    autoscaler can add nodes (the cluster is what it is now). Needs a connected Ray.

    1. The limits an autoscaler reports to the GCS (Ray 2.60: the ClusterConfig under the
       autoscaler's KV namespace: per node group max_count x its resources, capped by the
       config's max_resources; -1 means unbounded). This is what Ray Train's own check
       (WorkerGroup._check_cluster_resources_and_raise_if_insufficient) reads. Ray's own
       autoscalers (v1 monitor, v2) do not report it in 2.60; platforms that do (KubeRay
       operators, managed Ray) get an exact answer.
    2. An autoscaler running with a node provider that reported no limits (`ray up` clusters,
       KubeRay's autoscaler): its node types' max_workers live only in its config file, so the
       limits are unknown and every resource is unbounded (math.inf): nothing is refused, Ray
       Train waits for the nodes and the autoscaler reports a request it cannot place.
    3. Otherwise None: no autoscaler, or the read-only one `ray start --head` runs (which
       mirrors the nodes that joined by hand and never adds any).
    """
    limits = _reported_limits()
    if limits:
        return limits
    if _autoscaler_can_add_nodes():
        return dict(_UNBOUNDED)
    return None


# Limits unknown: every resource check passes.
_UNBOUNDED = {"CPU": math.inf, "GPU": math.inf}


def _reported_limits() -> Optional[dict[str, float]]:
    """The autoscaler's limits from the GCS ClusterConfig, or None when none was reported."""
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - another Ray version or an unreadable config: unknown
        return None
    if not limits:
        return None
    return {k: math.inf if v >= sys.maxsize else float(v) for k, v in limits.items()}


def _readonly_type(node_type: str) -> bool:
    """The anonymous node type Ray's read-only provider gives a hand-started node."""
    return node_type.startswith("node_") and all(
        c in "0123456789abcdef" for c in node_type[len("node_") :]
    )


def _autoscaler_can_add_nodes() -> bool:
    """An autoscaler with a real node provider runs: its node types carry configured names
    (the read-only provider of a plain `ray start --head` names each node node_<id>)."""
    return any(not _readonly_type(t) for t in _autoscaler_node_types())


def _autoscaler_node_types() -> list[str]:
    """Node type names of the nodes the autoscaler knows: from the v1 monitor's status in the
    GCS KV (autoscaler_report.node_type_mapping), else from the v2 autoscaler's cluster status
    (the ray_node_type_name of each node). [] when neither is there or readable."""
    import ray

    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        if raw:
            report = json.loads(raw).get("autoscaler_report") or {}
            mapping = report.get("node_type_mapping") or {}
            if mapping:
                return [str(t) for t in mapping.values()]
    except Exception:  # noqa: BLE001 - an unreadable status: ask v2 below
        pass
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if not is_autoscaler_v2(fetch_from_server=True):
            return []
        gcs = ray.get_runtime_context().gcs_address
        status = get_cluster_status(gcs)
        nodes = [*status.active_nodes, *status.idle_nodes]
        types = [str(n.ray_node_type_name) for n in nodes if n.ray_node_type_name]
        return types + [str(n.ray_node_type_name) for n in status.pending_launches]
    except Exception:  # noqa: BLE001 - another Ray version: no autoscaler known
        return []


def job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime_env that `ray job submit` gave this driver's job ({} for a
    driver started by hand). Ray's JobSupervisor passes the job's config to the driver in the
    variable named by ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR (its value
    is that name), and ray.init(runtime_env=...) refuses to set any of these again ("Failed to
    merge the Job's runtime env")."""
    try:
        from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR as var
    except ImportError:  # another Ray version
        var = "RAY_JOB_CONFIG_JSON_ENV_VAR"
    try:
        job = json.loads(os.environ.get(var) or "{}")
        env = (job.get("runtime_env") or {}).get("env_vars") or {}
        return {str(k): str(v) for k, v in env.items()}
    except (ValueError, AttributeError):
        return {}


# Ray's JobSupervisor SIGKILLs a stopped job this many seconds after its SIGTERM unless the
# variable below is set where the supervisor runs (ray/dashboard/modules/job/job_supervisor.py:
# DEFAULT_RAY_JOB_STOP_WAIT_TIME_S, read from os.environ when it stops the job).
DEFAULT_JOB_STOP_WAIT_S = 3
JOB_STOP_WAIT_VAR = "RAY_JOB_STOP_WAIT_TIME_S"


def job_stop_grace_s() -> Optional[float]:
    """How long `ray job stop` waits after SIGTERM before it kills this driver's job, or None
    when this process is not the driver of a submitted job (RAY_JOB_CONFIG_JSON_ENV_VAR with a
    job_submission_id in its metadata). The supervisor reads the grace from its own environment
    (the job's runtime_env env_vars, or the node's environment) and starts the driver with a
    copy of that environment, so the driver's own value is the one that applies."""
    try:
        from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR as var
    except ImportError:  # another Ray version
        var = "RAY_JOB_CONFIG_JSON_ENV_VAR"
    try:
        job = json.loads(os.environ.get(var) or "{}")
        submitted = bool((job.get("metadata") or {}).get("job_submission_id"))
    except (ValueError, AttributeError):
        submitted = False
    if not submitted:
        return None
    value = os.environ.get(JOB_STOP_WAIT_VAR) or job_env_vars().get(JOB_STOP_WAIT_VAR)
    try:
        return float(int(value)) if value else float(DEFAULT_JOB_STOP_WAIT_S)
    except ValueError:  # the supervisor's own int() fails on it: no grace to count on
        return float(DEFAULT_JOB_STOP_WAIT_S)


# Worker-log lines that say nothing about the run, dropped from the driver's console (each
# pattern one exact message; everything else Ray prints is passed on unchanged).
NOISE = (
    # Ray Train 2.60's controller starts its PreemptionWatcher actor with max_restarts > 0 and
    # arguments in the object store; Ray core logs that at ERROR level (ray issue #53727).
    re.compile(
        r"Actor with class name: 'PreemptionWatcher' and ID: '\w+' has constructor arguments in"
        r" the object store and max_restarts > 0"
    ),
)


def settle_token_auth() -> None:
    """For a private local Ray: token auth on, as Ray 2.60 turns it on for every new local
    cluster, without the warning it prints each time it does (the mode is then explicit, which
    Ray respects silently). Ray's own switch is used: it also refreshes the configuration Ray
    cached at import, which an environment variable set now would not reach. An explicit
    RAY_AUTH_MODE is left as it is."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # another Ray: its own default, and its warning
        return
    _enable_token_auth()


# Ray Train parts a private local cluster does not need, turned off through Ray's own switches
# (read by Ray Train's controller, which inherits this environment): the PreemptionWatcher
# actor polls every node for spot-preemption notices, which this machine never gets; on 2
# cores it took 15-18% of a core for the whole run.
LOCAL_CLUSTER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def drop_noise_from_worker_logs() -> None:
    """Worker output reaches this driver's console without the NOISE lines. Ray prints worker
    logs through one handler ("ray_print_logs") of its stdstream dispatcher; it is replaced by
    the same printer behind a line filter. Nothing changes when Ray's internals differ."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        printer = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):
        return
    if not any(name == "ray_print_logs" for name, _ in getattr(dispatcher, "handlers", [])):
        return  # log_to_driver off: nothing is printed

    def emit(data: dict) -> None:
        lines = [ln for ln in data.get("lines", []) if not any(p.search(ln) for p in NOISE)]
        if lines:
            printer({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", emit)


def quiet_train_logs() -> None:
    """Ray Train logs every report ("Reporting training result ...") at INFO under a logger
    named after its file, which RunConfig's LoggingConfig does not reach."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train version: its logging stays as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
