"""raygpt models: GPTConfig (models/config.py, torch-free) and the GPT (models/gpt.py).

The torch names are imported only when used, so `from models import GPTConfig` stays light."""

from __future__ import annotations

import importlib
from typing import Any

from models.config import GPTConfig

_LAZY = {
    "GPT": "models.gpt",
    "estimate_flops_per_token": "models.gpt",
    "estimate_num_params": "models.gpt",
}

__all__ = ["GPT", "GPTConfig", "estimate_flops_per_token", "estimate_num_params"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
