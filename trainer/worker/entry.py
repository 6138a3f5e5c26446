"""What every worker gets from the driver (WorkerConfig) and runs (train_worker)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from trainer.config import RootConfig


@dataclass(frozen=True)
class WorkerConfig:
    """The driver's hand-off to every worker (trainer/driver/run.py builds it).

    cfg: the validated root config. data_dir: the prepared dataset (a mixture's first source).
    console_lines: rank 0 prints a line per logged step (off while the driver draws a bar).
    universal: {"checkpoint": name, "dir": uri} when the checkpoint this run resumes from was
    converted for a new layout (trainer/checkpoint/universal.py), else None.
    peak_flops: the device's peak FLOP/s when the driver measured it (CPU workers of the
    private local cluster), else None: each worker resolves its own.
    invocation: this invocation's id, written into summary.json so the driver reads its own.
    """

    cfg: RootConfig
    data_dir: str
    invocation: str
    console_lines: bool = True
    universal: Optional[dict[str, str]] = None
    peak_flops: Optional[float] = None


def train_worker(config: WorkerConfig, context: Any) -> None:
    """What every worker runs (cluster.fit calls it): context is cluster/worker_context.py's."""
    from data_pipeline import storage
    from trainer.worker.loop import Trainer

    storage.configure(config.cfg.storage)
    Trainer(config, context).train()
