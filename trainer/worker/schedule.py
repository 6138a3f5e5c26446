"""Learning-rate schedule: a pure function of the optimizer step, so resume is exact."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from trainer.config import OptimConfig

# optim.schedule -> the LR after warmup, from (peak, floor, progress in [0, 1]).
DECAYS: dict[str, Callable[[float, float, float], float]] = {
    "constant": lambda peak, floor, progress: peak,
    "linear": lambda peak, floor, progress: peak - (peak - floor) * progress,
    "cosine": lambda peak, floor, progress: (
        floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    ),
}


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (1-based): linear warmup, then decay to min_lr_ratio*lr."""
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    if optim.warmup_steps and step <= optim.warmup_steps:
        return peak * step / optim.warmup_steps
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return DECAYS[optim.schedule](peak, floor, progress)


class Scheduler:
    """Sets the optimizer's learning rate for a step. It holds no state of its own (the LR is
    lr_at of the step), so a resumed run continues the schedule exactly."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int):
        self.optimizer, self.optim, self.max_steps = optimizer, optim, max_steps

    def step(self, step: int) -> float:
        """Sets and returns the LR of optimizer step `step` (1-based) on every param group."""
        lr = lr_at(step, self.optim, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


def build_scheduler(optimizer, optim: OptimConfig, max_steps: int) -> Scheduler:
    """The schedule of `optim` over max_steps for `optimizer` (a DeepSpeed engine's optimizer:
    its param_groups are the torch optimizer's)."""
    return Scheduler(optimizer, optim, max_steps)
