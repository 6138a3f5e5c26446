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


EXPECTED = "expected a Hugging Face model directory: config.json + model.safetensors"


def _not_a_model_dir(hf_dir: str) -> str:
    """Why hf_dir (which has no config.json) is not a Hugging Face model directory, and what
    to do when it is a raygpt run or checkpoint (the other kind of model directory)."""
    from trainer.checkpoint.format import STATE_FILE
    from trainer.checkpoint.index import CHECKPOINT_PREFIX

    if storage.is_file(hf_dir):
        return f"{hf_dir} is a file ({EXPECTED})"
    if not storage.is_dir(hf_dir):
        return f"{hf_dir} does not exist ({EXPECTED})"
    names = storage.listdir(hf_dir)
    kind = None
    if STATE_FILE in names:
        kind = "a raygpt checkpoint directory"
    elif any(n.startswith(CHECKPOINT_PREFIX) for n in names):
        kind = "a raygpt run directory"
    if kind is None:
        return f"{hf_dir} has no {CONFIG_FILE} ({EXPECTED})"
    return (
        f"{hf_dir} is {kind}, not a Hugging Face model directory (config.json + "
        f"model.safetensors): export it with `python -m trainer.export {hf_dir} OUT` and set "
        "model.init_from=OUT, or continue that run by its run.name"
    )


def _read_config(hf_dir: Path | str) -> dict[str, Any]:
    path = storage.join(str(hf_dir), CONFIG_FILE)
    if storage.is_file(str(hf_dir)):  # e.g. the model.safetensors or config.json itself
        raise ValueError(_not_a_model_dir(str(hf_dir)))
    try:
        text = storage.read_text(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ValueError(_not_a_model_dir(str(hf_dir))) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {storage.one_line(e)}") from None
    try:
        return json.loads(text)
    except ValueError as e:  # the message keeps json's "line L column C (char N)"
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def check_hf_config(cfg: GPTConfig, hf_dir: str) -> None:
    """ValueError (one line) unless the HF config in hf_dir has cfg's architecture and shapes
    and its weights are there as safetensors (check_hf_weights).

    Reads config.json and the listing only, so the driver can validate before any worker
    starts and before the run directory exists.
    """
    hf = _read_config(hf_dir)  # its errors name the path already
    try:
        theirs = shape_of(config_from_hf(hf))
    except ValueError as e:
        raise ValueError(f"init_from {hf_dir}: {e}") from None
    ours = shape_of(cfg)
    for field in [*ours, *(k for k in theirs if k not in ours)]:
        if ours.get(field) != theirs.get(field):
            raise ValueError(
                f"init_from {hf_dir}: model.{field} is {ours.get(field)!r} but the Hugging Face "
                f"checkpoint has {theirs.get(field)!r}"
            )
    check_hf_weights(hf_dir)


# Weight files of other formats, named when they are all a directory holds.
OTHER_WEIGHTS = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
)


def check_hf_weights(hf_dir: str) -> None:
    """ValueError (one line) unless hf_dir holds its weights as safetensors: model.safetensors,
    or model.safetensors.index.json and every shard it lists. Reads the listing (and the
    index), so the driver can check before the run directory exists."""
    names = set(storage.listdir(hf_dir))
    if WEIGHTS_FILE in names:
        return
    if INDEX_FILE in names:
        index = storage.join(hf_dir, INDEX_FILE)
        try:
            shards = sorted(set(json.loads(storage.read_text(index))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{index} is not a safetensors index ({storage.one_line(e)})"
            ) from None
        missing = [s for s in shards if s not in names]
        if missing:
            raise ValueError(
                f"{hf_dir}: {INDEX_FILE} lists {len(missing)} shard(s) the directory lacks "
                f"(first: {missing[0]}): copy the whole model directory"
            )
        return
    other = [n for n in OTHER_WEIGHTS if n in names]
    found = f"it has only {', '.join(other)}" if other else "it has no weights"
    raise ValueError(
        f"{hf_dir} has no {WEIGHTS_FILE} (or {INDEX_FILE}): {found}; raygpt reads safetensors "
        "only: save the model with `save_pretrained(OUT, safe_serialization=True)` and set "
        "model.init_from=OUT"
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
