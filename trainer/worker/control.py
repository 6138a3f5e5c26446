"""When to stop, and when a time-based checkpoint is due, decided alike on every rank.

The checkpoint policy itself is trainer/checkpoint/manager.py's CheckpointPolicy. Stop request:
SIGTERM to the driver (a preemption notice, `ray job stop`) sets a flag the worker context
reads (cluster/worker_context.py: a small Ray actor owned by the driver, or this process's
flag). Rank 0 polls it (at most once a second) and broadcasts its decisions (stop now, time-based checkpoint due) to every rank with one tiny
collective, so all ranks checkpoint and stop at the same step boundary: every step on CPU
workers (gloo), every `EVERY_STEPS` steps with NCCL (there each broadcast is a host sync).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from trainer.checkpoint.manager import CheckpointPolicy

POLL_S = 1.0
EVERY_STEPS = 5  # steps between stop/time-checkpoint decisions


def comm_device() -> torch.device:
    """Where a tensor must live for a collective of the default process group."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class StepControl:
    """Per step, every rank learns (stop requested, time-based checkpoint due) from rank 0."""

    def __init__(self, policy: CheckpointPolicy, rank: int, context: Any):
        self.policy = policy
        self.context = context  # its stop_requested(): the driver's stop request, if any
        self.rank = rank
        self.stop_reason: Optional[str] = None
        self._polled = 0.0
        self._sync = dist.is_initialized() and dist.get_world_size() > 1
        self._every = EVERY_STEPS if comm_device().type == "cuda" else 1

    def _poll(self) -> None:
        if self.stop_reason or time.monotonic() - self._polled < POLL_S:
            return
        self._polled = time.monotonic()
        try:
            self.stop_reason = self.context.stop_requested()
        except Exception:  # noqa: BLE001 - a lost driver ends the run anyway; keep training
            pass

    def decide(self, step: int) -> tuple[bool, bool]:
        """(stop, time_due), identical on every rank. One 2-int broadcast every step on CPU,
        every EVERY_STEPS steps on GPUs; the other steps cost nothing."""
        if step % self._every:
            return False, False
        flags = torch.zeros(2, dtype=torch.int64)
        if self.rank == 0:
            self._poll()
            flags[0] = int(bool(self.stop_reason))
            flags[1] = int(self.policy.time_due())
        if self._sync:
            flags = flags.to(comm_device())
            dist.broadcast(flags, src=0)
        stop, due = bool(flags[0]), bool(flags[1])
        if stop and not self.stop_reason:
            self.stop_reason = "stop requested"
        return stop, due
