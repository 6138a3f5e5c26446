"""Loss-spike and NaN guard.

Every step's loss (mean over micro batches and data-parallel ranks, so every rank decides the
same) is judged before the optimizer steps: non-finite, or above `spike_factor` x the running
mean of accepted losses, makes it a bad step. A bad step is skipped (no parameter or optimizer
state changes), logged and counted. After `max_consecutive` bad steps in a row the run either
rolls back to its last checkpoint and continues past the offending data, or stops with a
clear message (`on_repeated`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from trainer.config import GuardConfig  # the schema is config's; re-exported for callers
from trainer.worker.control import comm_device

# DeepSpeed patches live in ds_patches.py; the guarded skip is re-exported here for callers.
from trainer.worker.ds_patches import innermost_optimizer, skipped_optimizer_step  # noqa: F401
from trainer.worker.readback import Readback


class TooManyBadSteps(RuntimeError):
    """Raised with on_repeated=stop; its message is the one line the user sees."""


class LossGuard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.mean: Optional[float] = None
        self.accepted = 0
        self.consecutive = 0
        self.skipped = 0

    def judge(self, loss: float) -> Optional[str]:
        """Why this step's loss is bad, or None if it is fine."""
        if not self.cfg.enabled:
            return None
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        c = self.cfg
        if c.spike_factor and self.mean is not None and self.accepted >= c.warmup_steps:
            if loss > c.spike_factor * self.mean:
                return (
                    f"loss spike ({loss:.4f} > {c.spike_factor:g} x running mean {self.mean:.4f})"
                )
        return None

    def accept(self, loss: float) -> None:
        self.consecutive = 0
        self.accepted += 1
        b = self.cfg.ema_beta
        self.mean = loss if self.mean is None else b * self.mean + (1 - b) * loss

    def reject(self) -> bool:
        """Counts a skipped step; True when max_consecutive bad steps have come in a row."""
        self.skipped += 1
        self.consecutive += 1
        return self.consecutive >= self.cfg.max_consecutive

    def state_dict(self) -> dict:
        return {"mean": self.mean, "accepted": self.accepted, "skipped": self.skipped}

    def load_state_dict(self, d: dict) -> None:
        self.mean, self.accepted, self.skipped = d["mean"], d["accepted"], d["skipped"]
        self.consecutive = 0


class StepJudge:
    """The guard as a step component, handed to train_step. `start(losses)` after the last
    forward queues the step's loss sum and count, summed over every rank (one all-reduce of
    two numbers, reused as the step's logged loss), and their copy to the host; `verdict()`
    after the backward, before the optimizer steps, reads them (trainer/worker/readback.py:
    on CUDA the backward is already queued behind the copy, so the device never idles for
    it) and keeps the verdict, the same on every rank; `settle()` after the step accepts the
    loss or counts the skip."""

    def __init__(self, guard: LossGuard):
        self.guard = guard
        self._pending: Optional[Readback] = None
        self.loss: Optional[float] = None
        self.reason: Optional[str] = None

    def reset(self) -> None:
        self.loss, self.reason, self._pending = None, None, None

    def start(self, losses: list[torch.Tensor]) -> None:
        total = losses[0].detach().double()
        for x in losses[1:]:  # in order, in float64: the sum a host loop over .item() makes
            total = total + x.detach().double()
        count = torch.full((), float(len(losses)), dtype=torch.float64, device=total.device)
        t = torch.stack([total, count])
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = t.to(comm_device())  # NCCL reduces only GPU tensors
            dist.all_reduce(t)
        self._pending = Readback(t)

    def verdict(self) -> bool:
        """True when the step is bad (its reason in `reason`); reads what `start` queued."""
        assert self._pending is not None, "StepJudge.start first"
        total, count = self._pending.read()
        self._pending = None
        self.loss = total / count
        self.reason = self.guard.judge(self.loss)
        return self.reason is not None

    def settle(self, skipped: bool) -> bool:
        """Accepts the step's loss or counts the skip; True when a rollback is due."""
        if skipped:
            return self.guard.reject()
        if self.loss is not None:
            self.guard.accept(self.loss)
        return False
