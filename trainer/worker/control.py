"""When to checkpoint and when to stop: the checkpoint policy and the driver's stop request.

Policy (TrainerConfig): a checkpoint every `checkpoint_interval` steps, another whenever
`checkpoint_every_minutes` passed since the last one, and a final one at the last step of the
invocation. Ray keeps the newest `keep_last`; every `keep_every`-th interval checkpoint is also
kept for good under run_dir/kept/.

Stop request: SIGTERM to the driver (a preemption notice, `ray job stop`) sets a flag in a small
Ray actor owned by the driver (cluster/launch.py). Rank 0 polls it (at most once a second) and
broadcasts its decisions (stop now, time-based checkpoint due) to every rank with one tiny
collective, so all ranks checkpoint and stop at the same step boundary: every step on CPU
workers (gloo), every `EVERY_STEPS` steps with NCCL (there each broadcast is a host sync).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.distributed as dist

from trainer.config import TrainerConfig

POLL_S = 1.0
EVERY_STEPS = 5  # steps between stop/time-checkpoint decisions


class CheckpointPolicy:
    def __init__(self, t: TrainerConfig, clock: Callable[[], float] = time.monotonic):
        self.interval = t.checkpoint_interval
        self.every_s = t.checkpoint_every_minutes * 60 if t.checkpoint_every_minutes else None
        self.keep_every = t.keep_every
        self.clock = clock
        self.last_save = clock()

    def time_due(self) -> bool:
        return self.every_s is not None and self.clock() - self.last_save >= self.every_s

    def reason(self, step: int, *, last: bool, time_due: bool, stop: bool) -> Optional[str]:
        """Why `step` is checkpointed (None: it is not)."""
        if last:
            return "final"
        if stop:
            return "stop"
        if self.interval and step % self.interval == 0:
            return "interval"
        return "time" if time_due else None

    def saved(self) -> None:
        self.last_save = self.clock()

    def keep_for_good(self, step: int) -> bool:
        return (
            bool(self.keep_every and self.interval)
            and step % (self.keep_every * self.interval) == 0
        )


def comm_device() -> torch.device:
    """Where a tensor must live for a collective of the default process group."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class StepControl:
    """Per step, every rank learns (stop requested, time-based checkpoint due) from rank 0."""

    def __init__(
        self,
        policy: CheckpointPolicy,
        stop_signal: Any,
        rank: int,
        read_signal: Callable[[Any], Optional[str]],
    ):
        self.policy = policy
        self.signal = stop_signal
        self.read_signal = read_signal  # the worker context's stop_requested
        self.rank = rank
        self.stop_reason: Optional[str] = None
        self._polled = 0.0
        self._sync = dist.is_initialized() and dist.get_world_size() > 1
        self._needed = stop_signal is not None or policy.every_s is not None
        self._every = EVERY_STEPS if comm_device().type == "cuda" else 1

    def _poll(self) -> None:
        if self.signal is None or self.stop_reason or time.monotonic() - self._polled < POLL_S:
            return
        self._polled = time.monotonic()
        try:
            self.stop_reason = self.read_signal(self.signal)
        except Exception:  # noqa: BLE001 - a lost driver ends the run anyway; keep training
            pass

    def decide(self, step: int) -> tuple[bool, bool]:
        """(stop, time_due), identical on every rank. One 2-int broadcast every step on CPU,
        every EVERY_STEPS steps on GPUs; the other steps cost nothing."""
        if not self._needed or step % self._every:
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
