"""Ray Train's train_loop_per_worker: what every worker runs."""

from __future__ import annotations

from typing import Any


def train_worker(config: dict[str, Any]) -> None:
    """config: {"cfg": RootConfig, "data_dir", "console_lines", "universal", "stop_signal",
    "invocation"} (trainer/driver/run.py)."""
    from trainer.worker.trainer import Trainer

    Trainer(config).train()
