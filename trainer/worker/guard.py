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

from trainer.config import GuardConfig  # the schema is config's; re-exported for callers

# DeepSpeed patches live in ds_patches.py; the guarded skip is re-exported here for callers.
from trainer.worker.ds_patches import innermost_optimizer, skipped_optimizer_step  # noqa: F401


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
    """The guard as a step component: `judge(losses)` is handed to train_step, sees the loss
    averaged over every rank (one all-reduce, reused as the step's logged loss) and keeps the
    verdict; `settle()` after the step accepts or counts it."""

    def __init__(self, guard: LossGuard, mean_across_ranks):
        self.guard = guard
        self._mean = mean_across_ranks
        self.loss: Optional[float] = None
        self.reason: Optional[str] = None

    def reset(self) -> None:
        self.loss, self.reason = None, None

    def __call__(self, losses) -> bool:
        self.loss = self._mean([x.float().item() for x in losses])
        self.reason = self.guard.judge(self.loss)
        return self.reason is not None

    def settle(self, skipped: bool) -> bool:
        """Accepts the step's loss or counts the skip; True when a rollback is due."""
        if skipped:
            return self.guard.reject()
        if self.loss is not None:
            self.guard.accept(self.loss)
        return False
