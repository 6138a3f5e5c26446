"""`python -m trainer.export <run_dir or checkpoint_dir> <out_dir> [--dtype fp32|bf16]`

Writes a Hugging Face model directory (model.safetensors, config.json, generation_config.json
and the run's tokenizer) that `AutoModelForCausalLM.from_pretrained(out_dir)` and
`AutoTokenizer.from_pretrained(out_dir)` load: GPT2LMHeadModel for learned-position models,
LlamaForCausalLM for RoPE ones (see models/hf.py).

The weights are the fp32 ones of the checkpoint, consolidated from the DeepSpeed shards of
every rank (ZeRO 1/2/3 via DeepSpeed's zero_to_fp32; ZeRO-0 from the replicated module state).
The directory appears complete or not at all: it is written beside out_dir and renamed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from data_pipeline.config import EOS_TOKEN
from models.gpt import GPTConfig
from models.hf import hf_config, to_hf_state_dict
from trainer.checkpoint import DS_TAG, STATE_FILE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


class ExportError(Exception):
    """Bad input for the export (reported as one `error:` line, exit status 2)."""


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _step_of(path: Path) -> int:
    match = re.fullmatch(r"checkpoint_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _is_complete(ckpt: Path) -> bool:
    return (ckpt / STATE_FILE).is_file() and (ckpt / "ds" / DS_TAG).is_dir()


def find_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint directory, else the latest complete checkpoint_* in
    it (complete = trainer_state.json and the DeepSpeed tag directory are present)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory (give a run dir or a checkpoint_* dir)")
    if (path / STATE_FILE).is_file():
        if not _is_complete(path):
            raise ExportError(f"checkpoint {path} is incomplete: no ds/{DS_TAG}/ directory")
        return path
    candidates = [p for p in path.glob("checkpoint_*") if _step_of(p) >= 0 and _is_complete(p)]
    if not candidates:
        raise ExportError(f"no complete checkpoint_* directory (with {STATE_FILE}) in {path}")
    return max(candidates, key=_step_of)


def _model_config(state: dict[str, Any], ckpt_dir: Path) -> GPTConfig:
    try:
        raw = state["config"]["model"]
        known = {f.name for f in dataclasses.fields(GPTConfig)}
        return GPTConfig(**{k: v for k, v in raw.items() if k in known})
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{ckpt_dir / STATE_FILE} holds no valid model config: {e}") from None


def _load_model_states(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - retried below, and a real failure is raised there
        # DeepSpeed's own mp_rank_*_model_states.pt may pickle objects (its config, optimizer
        # scalars) that weights_only refuses; this file comes from our own training run.
        return torch.load(path, map_location="cpu", weights_only=False)


def _consolidate(ds_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from the DeepSpeed directory ckpt/ds (any ZeRO stage)."""
    tag_dir = ds_dir / DS_TAG
    if any(tag_dir.glob("*_optim_states.pt")):
        # ZeRO 1/2/3: the fp32 master weights live, flattened and partitioned, in the
        # optimizer shards of every rank; DeepSpeed reassembles them by parameter name.
        if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # It prints a line per step and draws progress bars; failures come back as exceptions.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DS_TAG)
    # ZeRO-0 (plain data parallel): rank 0's module state is the whole model. With bf16 these
    # are the bf16 weights (the fp32 master copy sits unnamed in the optimizer state).
    states = _load_model_states(tag_dir / "mp_rank_00_model_states.pt")
    return dict(states["module"])


def consolidated_state_dict(ckpt_dir: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The checkpoint's model config and its full fp32 state dict, loadable into GPT(config)
    with strict=True (with tied embeddings both wte.weight and lm_head.weight are present and
    are one tensor)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        state = json.loads((ckpt_dir / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {ckpt_dir / STATE_FILE}: {_one_line(e)}") from None
    cfg = _model_config(state, ckpt_dir)
    try:
        raw = _consolidate(ckpt_dir / "ds")
    except Exception as e:  # noqa: BLE001 - any failure reading the shards is bad input here
        raise ExportError(
            f"cannot read the DeepSpeed checkpoint in {ckpt_dir / 'ds'}: "
            f"{type(e).__name__}: {_one_line(e)}"
        ) from None
    sd = {
        k.removeprefix("module."): v.detach().float() if v.is_floating_point() else v.detach()
        for k, v in raw.items()
    }
    if cfg.tie_embeddings:
        # DeepSpeed keeps the shared tensor once and re-adds the alias from shared_params;
        # accept either name and hand out one tensor under both, as GPT.state_dict() does.
        shared = sd.get("wte.weight", sd.get("lm_head.weight"))
        if shared is not None:
            sd["wte.weight"] = sd["lm_head.weight"] = shared
    expected = _state_keys(cfg)
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise ExportError(
            f"checkpoint {ckpt_dir} does not match its model config: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, t in sd.items():
        if t.numel() == 0:
            raise ExportError(f"checkpoint {ckpt_dir}: tensor {name} is empty (not consolidated)")
    return cfg, sd


def _state_keys(cfg: GPTConfig) -> set[str]:
    """The keys of GPT(cfg).state_dict(), from a weightless (meta device) instance."""
    from models.gpt import GPT

    with torch.device("meta"):
        return set(GPT(cfg).state_dict().keys())


# -----------------------------------------------------------------------------
# Writing the Hugging Face directory


def _tokenizer_source(data_dir: Optional[str]) -> tuple[Optional[Path], str]:
    """(tokenizer.json of the dataset, "") or (None, why not)."""
    if not data_dir:
        return None, "the checkpoint's config names no data.out_dir"
    d = Path(data_dir)
    if not d.is_dir():
        return None, f"the dataset dir {d} (data.out_dir) is gone"
    name = "tokenizer.json"
    try:
        name = json.loads((d / "manifest.json").read_text())["tokenizer"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no manifest: try the default file name
    path = d / name
    if not path.is_file():
        return None, f"dataset dir {d} has no {name}"
    return path, ""


def write_model_dir(
    out_dir: Path,
    cfg: GPTConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    dtype: str = "fp32",
    tokenizer_file: Optional[Path] = None,
) -> None:
    """Writes the HF files for (cfg, state_dict) into out_dir (created if absent)."""
    from safetensors.torch import save_file

    torch_dtype = DTYPES[dtype]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eos_id: Optional[int] = None
    if tokenizer_file is not None:
        from tokenizers import Tokenizer

        eos_id = Tokenizer.from_file(str(tokenizer_file)).token_to_id(EOS_TOKEN)
        shutil.copyfile(tokenizer_file, out_dir / "tokenizer.json")
        special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
        _write_json(
            out_dir / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **special,
                "model_max_length": cfg.block_size,
                "clean_up_tokenization_spaces": False,
            },
        )
        _write_json(out_dir / "special_tokens_map.json", special)

    tensors = to_hf_state_dict(state_dict, cfg, dtype=torch_dtype)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(cfg)
    dtype_name = _DTYPE_NAMES[torch_dtype]
    config.update(
        torch_dtype=dtype_name,  # transformers < 5
        dtype=dtype_name,  # transformers >= 5
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    _write_json(out_dir / "config.json", config)
    generation = {"bos_token_id": eos_id, "eos_token_id": eos_id} if eos_id is not None else {}
    _write_json(out_dir / "generation_config.json", generation)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def export(ckpt_dir: Path, out_dir: Path, dtype: str = "fp32") -> Path:
    """Exports checkpoint ckpt_dir as an HF model directory out_dir (absent or empty)."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} must be one of {sorted(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not empty: choose a new output directory")
    cfg, sd = consolidated_state_dict(ckpt_dir)
    try:
        hf_config(cfg)
    except ValueError as e:
        raise ExportError(str(e)) from None
    state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
    tokenizer_file, why = _tokenizer_source(state.get("config", {}).get("data", {}).get("out_dir"))
    if tokenizer_file is None:
        print(f"warning: exporting the model without a tokenizer: {why}", file=sys.stderr)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_model_dir(tmp, cfg, sd, dtype=dtype, tokenizer_file=tokenizer_file)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); os.replace cannot replace a directory
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description="Export a raygpt checkpoint as a Hugging Face model directory.",
    )
    parser.add_argument("path", type=Path, help="a run directory or a checkpoint_* directory")
    parser.add_argument("out_dir", type=Path, help="new (or empty) output directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    try:
        ckpt = find_checkpoint(args.path)
        step = json.loads((ckpt / STATE_FILE).read_text()).get("step")
        out = export(ckpt, args.out_dir, args.dtype)
    except (ExportError, OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} (step {step}) to {out} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
