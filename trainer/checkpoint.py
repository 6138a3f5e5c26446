"""Checkpoints: DeepSpeed sharded engine state + trainer state, persisted through Ray Train.

Layout of one checkpoint directory (Ray Train merges the files of every worker into it):
    ds/                       DeepSpeed engine state (model, optimizer shards per rank)
    rng/rank_<r>.pt           torch/numpy/python RNG states of each rank (tensors only)
    trainer_state.json        step, consumed samples, loader state, W&B id, config
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

DS_TAG = "ds"
STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss = (int(x) for x in state["numpy_pos"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            pos,
            has_gauss,
            float(state["numpy_gauss"][0]),
        )
    )
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_local(engine, rank: int, trainer_state: dict[str, Any]) -> Path:
    """Writes this worker's share of a checkpoint into a fresh local directory."""
    d = Path(tempfile.mkdtemp(prefix="raygpt-ckpt-"))
    engine.save_checkpoint(str(d / "ds"), tag=DS_TAG)
    (d / "rng").mkdir()
    torch.save(rng_state(), d / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        (d / STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n")
    return d


def report(metrics: dict[str, Any], local_dir: Optional[Path], step: int) -> None:
    """Persists the local directory as checkpoint `checkpoint_<step>` (a barrier across workers)."""
    import ray.train

    if local_dir is None:
        ray.train.report(metrics)
        return
    try:
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(local_dir)),
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


def read_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())


def load(engine, ckpt_dir: Path, rank: int) -> dict[str, Any]:
    """Restores engine, RNG and trainer state from a checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    path, _ = engine.load_checkpoint(
        str(ckpt_dir / "ds"),
        tag=DS_TAG,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {ckpt_dir / 'ds'}")
    rng_file = ckpt_dir / "rng" / f"rank_{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return read_trainer_state(ckpt_dir)
