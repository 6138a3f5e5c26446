"""cluster.fit: run a worker function on the configured cluster, whichever it is.

fit(fn, payload, options) calls fn(payload, context) on every worker: cluster.num_workers Ray
Train workers, or the one worker of a private local cluster in this process
(cluster.launch=process: cluster/inprocess.py). `payload` is whatever the caller hands its
workers (picklable for Ray); `context` (cluster/worker_context.py) gives the rank, the world
size, the node and the driver's stop request (SIGTERM). Failures restart the workers up to
cluster.max_failures times. Nothing here knows what the workers do or what they write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.config import ClusterConfig

WorkerFn = Callable[[Any, Any], None]


@dataclass(frozen=True)
class FitOptions:
    """cluster: where and how many. storage_path: the run's storage URI (local, shared, s3://,
    gs://): Ray Train keeps its own bookkeeping under it and checks every node reaches it.
    job_env: environment for every process of the job on a joined Ray cluster."""

    cluster: ClusterConfig
    storage_path: str
    job_env: dict[str, str] = field(default_factory=dict)


def fit(fn: WorkerFn, payload: Any, options: FitOptions) -> None:
    """Runs fn(payload, context) on every worker until it returns (raises the failure that
    exhausted cluster.max_failures)."""
    if options.cluster.in_process:
        from cluster.inprocess import fit_here

        fit_here(fn, payload, options.cluster)
        return
    from cluster.launch import fit_on_ray

    fit_on_ray(fn, payload, options)
