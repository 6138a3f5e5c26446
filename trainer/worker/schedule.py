"""Learning-rate schedule: a pure function of the optimizer step, so resume is exact."""

from __future__ import annotations

import math

from trainer.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (1-based): linear warmup, then decay to min_lr_ratio*lr."""
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    if optim.warmup_steps and step <= optim.warmup_steps:
        return peak * step / optim.warmup_steps
    if optim.schedule == "constant":
        return peak
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    if optim.schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
