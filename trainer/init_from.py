"""Start training from a Hugging Face model directory (`model.init_from`).

The directory is what trainer.export writes, or a Hub checkpoint of a GPT-2 or Llama
architecture: config.json plus model.safetensors (or shards listed in
model.safetensors.index.json). Weights are converted with models.hf.from_hf.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from data_pipeline import storage
from models.gpt import GPT, GPTConfig, shape_of
from models.hf import config_from_hf, from_hf

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _read_config(hf_dir: Path | str) -> dict[str, Any]:
    path = storage.join(str(hf_dir), CONFIG_FILE)
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ValueError(
            f"init_from: {path} does not exist (expected a Hugging Face model "
            "directory: config.json + model.safetensors)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"init_from: cannot read {path}: {storage.one_line(e)}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"init_from: {path} is not valid JSON: {e}") from None


def check_hf_config(cfg: GPTConfig, hf_dir: str) -> None:
    """ValueError (one line) unless the HF config in hf_dir has cfg's architecture and shapes.

    Reads config.json only, so the driver can validate before any worker starts.
    """
    try:
        theirs = shape_of(config_from_hf(_read_config(hf_dir)))
    except ValueError as e:
        raise ValueError(f"init_from {hf_dir}: {e}") from None
    ours = shape_of(cfg)
    for field in [*ours, *(k for k in theirs if k not in ours)]:
        if ours.get(field) != theirs.get(field):
            raise ValueError(
                f"init_from {hf_dir}: model.{field} is {ours.get(field)!r} but the Hugging Face "
                f"checkpoint has {theirs.get(field)!r}"
            )


def _load_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (hf_dir / WEIGHTS_FILE).is_file():
        return load_file(str(hf_dir / WEIGHTS_FILE))
    if (hf_dir / INDEX_FILE).is_file():
        shards = sorted(set(json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(str(hf_dir / shard)))
        return tensors
    raise ValueError(f"init_from: {hf_dir} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")


def load_hf_weights(model: GPT, hf_dir: str) -> None:
    """Copies the weights of the HF model in hf_dir into `model` (every tensor, strict)."""
    check_hf_config(model.config, hf_dir)
    try:
        with storage.local_copy(hf_dir) as path:  # s3:// / gs:// models are downloaded first
            _, state_dict = from_hf(_read_config(path), _load_tensors(path))
    except ValueError as e:
        raise ValueError(f"init_from {hf_dir}: {e}") from None
    model.load_state_dict(state_dict, strict=True)
