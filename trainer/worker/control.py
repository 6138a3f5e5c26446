"""When to stop, and when a time-based checkpoint is due, decided alike on every rank.

The checkpoint policy itself is trainer/checkpoint/manager.py's CheckpointPolicy. Stop request:
SIGTERM to the driver (a preemption notice, `ray job stop`) sets a flag the worker context
reads (cluster/worker_context.py: a small Ray actor owned by the driver, or this process's
flag). Rank 0 polls it (at most once a second) and sends its decisions (stop, time-based
checkpoint due) to every rank with one tiny broadcast at a decision step, so all ranks act on
the same flags at the same step boundary. CPU workers (gloo): every step, read at once (a
gloo broadcast is host work; no device to wait for). NCCL: every `EVERY_STEPS` steps, and
the broadcast is asynchronous: every rank reads it at the NEXT decision step
(trainer/worker/readback.py; by then it has long arrived, so reading it never waits for the
device's queue), i.e. EVERY_STEPS steps after rank 0 saw the request. One process decides
alone, at once, without a tensor.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from trainer.checkpoint.manager import CheckpointPolicy
from trainer.worker.readback import Readback

POLL_S = 1.0
EVERY_STEPS = 5  # steps between stop/time-checkpoint decisions


def comm_device() -> torch.device:
    """Where a tensor must live for a collective of the default process group."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class StepControl:
    """Per decision step, every rank learns (stop requested, time-based checkpoint due)."""

    def __init__(
        self, policy: CheckpointPolicy, rank: int, context: Any, lagged: Optional[bool] = None
    ):
        """lagged: read each broadcast at the next decision step (default: with NCCL)."""
        self.policy = policy
        self.context = context  # its stop_requested(): the driver's stop request, if any
        self.rank = rank
        self.stop_reason: Optional[str] = None
        self._polled = 0.0
        self._sync = dist.is_initialized() and dist.get_world_size() > 1
        cuda = comm_device().type == "cuda"
        self._every = EVERY_STEPS if cuda else 1
        self._lagged = cuda if lagged is None else lagged
        self._in_flight: Optional[Readback] = None  # the flags sent at the last decision step
        self._due_sent_for: Optional[float] = None  # the policy's last save a "due" was sent for

    def _poll(self) -> None:
        if self.stop_reason or time.monotonic() - self._polled < POLL_S:
            return
        self._polled = time.monotonic()
        try:
            self.stop_reason = self.context.stop_requested()
        except Exception:  # noqa: BLE001 - a lost driver ends the run anyway; keep training
            pass

    def _flags(self) -> tuple[int, int]:
        """Rank 0's decisions now; a time checkpoint is sent once per due period (it is acted
        on a decision step later, when the policy has not yet seen the save)."""
        self._poll()
        due = self.policy.time_due() and self._due_sent_for != self.policy.last_save
        if due:
            self._due_sent_for = self.policy.last_save
        return int(bool(self.stop_reason)), int(due)

    def decide(self, step: int) -> tuple[bool, bool]:
        """(stop, time_due), identical on every rank. Nothing on the steps between decision
        steps; one process: rank 0's flags at once; several: this step's broadcast (lagged:
        the previous decision step's, while this step's goes out)."""
        if step % self._every:
            return False, False
        if not self._sync:
            stop, due = self._flags() if self.rank == 0 else (0, 0)
        else:
            if self._lagged:
                stop, due = self._in_flight.read() if self._in_flight else (0, 0)
            values = self._flags() if self.rank == 0 else (0, 0)
            # made on the device by fill kernels: a host tensor's copy to a GPU would sync
            flags = torch.stack(
                [torch.full((), v, dtype=torch.int64, device=comm_device()) for v in values]
            )
            sent = Readback(flags, dist.broadcast(flags, src=0, async_op=True))
            if self._lagged:
                self._in_flight = sent
            else:
                stop, due = sent.read()
        if stop and not self.stop_reason:
            self.stop_reason = "stop requested"
        return bool(stop), bool(due)
