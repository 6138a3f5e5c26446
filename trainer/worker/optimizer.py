"""The optimizer: parameter groups, and the torch optimizer that optim.name names.

A new optimizer is one entry in OPTIMIZERS (a function of the parameter groups and the optim
config) plus its name in OptimConfig's rule (trainer/config.py). DeepSpeed gets the built
optimizer as its client optimizer (trainer/worker/engine.py build_engine) and wraps it (ZeRO,
bf16); the learning rate is set per step by trainer/worker/schedule.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from trainer.config import OptimConfig

ParamGroups = list[dict[str, Any]]


def param_groups(model: torch.nn.Module, weight_decay: float) -> ParamGroups:
    """Weight decay on matrices (Linear, Embedding), none on biases and norm weights."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(groups: ParamGroups, optim: OptimConfig) -> torch.optim.Optimizer:
    """torch.optim.AdamW; optim.fused: one fused kernel per parameter group (CPU and CUDA)."""
    return torch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        fused=optim.fused or None,
    )


# optim.name -> builder. Every name here must be one OptimConfig accepts, and back
# (tests/unit/test_trainer_parts.py holds them together).
OPTIMIZERS: dict[str, Callable[[ParamGroups, OptimConfig], torch.optim.Optimizer]] = {
    "adamw": adamw,
}


def build_optimizer(
    model: torch.nn.Module, optim: OptimConfig, device_type: str = "cpu"
) -> torch.optim.Optimizer:
    """The optimizer optim.name names over `model`'s parameter groups (param_groups), its
    "auto" settings decided for the accelerator `device_type` ("cuda" | "cpu")."""
    optim = dataclasses.replace(optim, fused=optim.fused_on(device_type))
    return OPTIMIZERS[optim.name](param_groups(model, optim.weight_decay), optim)
