"""What a training worker asks of whatever started it, in one interface with two answers.

A worker needs its rank and the world size, where it runs, and whether a stop was asked for.
Checkpoints are not the cluster's business: the worker writes and finds them itself
(trainer/checkpoint/), in the storage the run names.

- RayContext: a Ray Train worker (any cluster); the stop request is an actor the driver owns.
- ProcessContext: the one worker of a private local cluster, run in the driver's process
  without Ray (cluster/inprocess.py); the stop request is a flag in this process.

cluster.fit hands the context to the worker function; worker code never imports ray.train.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

from cluster import ray_private


class StopFlag:
    """The stop request: set by the driver's SIGTERM handler, read by the workers (in this
    process directly; on Ray as an actor: cluster/launch.py)."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def get(self) -> Optional[str]:
        return self.reason


class RayContext:
    """A Ray Train worker's answers (ray.train's context; the driver's stop actor)."""

    def __init__(self, stop_signal: Any) -> None:
        import ray.train

        ray_private.quiet_train_logs()
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._stop_signal = stop_signal

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def stop_requested(self) -> Optional[str]:
        """The driver's stop request, if any (a round trip to its actor)."""
        import ray

        return ray.get(self._stop_signal.get.remote(), timeout=10)


class ProcessContext:
    """The one worker of a private local cluster, in this process (rank 0 of 1)."""

    rank = 0
    world_size = 1

    def __init__(self, flag: StopFlag):
        self._flag = flag

    def node_id(self) -> str:
        return f"local:{socket.gethostname()}"

    def stop_requested(self) -> Optional[str]:
        return self._flag.get()
