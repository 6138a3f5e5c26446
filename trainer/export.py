"""`python -m trainer.export <run_dir or checkpoint_dir> <out_dir> [--dtype fp32|bf16]`

Writes a Hugging Face model directory (model.safetensors, config.json, generation_config.json
and the run's tokenizer) that `AutoModelForCausalLM.from_pretrained(out_dir)` and
`AutoTokenizer.from_pretrained(out_dir)` load: GPT2LMHeadModel for learned-position models,
LlamaForCausalLM for RoPE ones (see models/hf.py).

The weights are the fp32 ones of the checkpoint, consolidated from the DeepSpeed files of
every rank: the fp32 master weights of the ZeRO 1/2/3 optimizer shards (ZeRO-0: the module
state), AutoTP shards concatenated in tensor-parallel rank order, pipeline layers renamed to
the GPT's module names; any data x tensor or data x pipeline layout, read from the run's
config. Every file is loaded with weights_only=True (see load_checkpoint_file).
The directory appears complete or not at all: it is written beside out_dir and renamed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch

from data_pipeline import storage
from data_pipeline.config import EOS_TOKEN
from data_pipeline.manifest import read_manifest
from models.gpt import GPTConfig
from models.hf import hf_config, to_hf_state_dict
from trainer.checkpoint.format import (
    DS_TAG,
    STATE_FILE,
    CheckpointError,
    read_trainer_state,
    safe_torch_load,
    verify_checkpoint,
)
from trainer.checkpoint.shards import (
    ShardLayout,
    layer_file,
    model_states_file,
    optim_states_file,
    zero3_model_states_file,
)
from trainer.worker.parallel import pipeline_layers, tensor_parallel_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


class ExportError(Exception):
    """Bad input for the export (reported as one `error:` line, exit status 2)."""


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def find_checkpoint(path: str | Path) -> str:
    """`path` itself if it is a checkpoint directory, else the run's latest verified checkpoint
    (trainer/checkpoint/index.py: the rule resume and rollback use; newer registered ones
    that are damaged are named on stderr and skipped); in a directory of checkpoints that
    nothing registered (copied by hand), the newest complete one. Any storage URI."""
    from trainer.checkpoint.index import complete_checkpoints, latest

    uri = storage.absolute(str(path))
    try:
        if storage.is_file(storage.join(uri, STATE_FILE)):
            verify_checkpoint(uri)
            if not storage.is_dir(storage.join(uri, "ds", DS_TAG)):
                raise ExportError(f"checkpoint {uri} is incomplete: no ds/{DS_TAG}/ directory")
            return uri
        if not storage.is_dir(uri):
            raise ExportError(f"{uri} does not exist (give a run dir or a checkpoint_* dir)")
        newest = latest(uri)
        found = newest.uri
        for damaged, problem in newest.damaged:
            print(f"export: skipping {storage.name(damaged)}: {problem}", file=sys.stderr)
        if found is None and not newest.damaged:
            complete = complete_checkpoints(uri)
            found = storage.join(uri, complete[-1]) if complete else None
    except CheckpointError as e:
        raise ExportError(f"checkpoint {uri} is damaged: {e}") from None
    if found is None and storage.is_file(storage.join(uri, "config.json")):
        raise ExportError(
            f"{uri} is a Hugging Face model directory (what export writes), not a raygpt run: "
            "give a run directory or one of its checkpoint_* directories"
        )
    if found is None:
        raise ExportError(f"no complete checkpoint_* directory (with {STATE_FILE}) in {uri}")
    return found


def _model_config(state: dict[str, Any], ckpt_dir: Path) -> GPTConfig:
    try:
        raw = state["config"]["model"]
        known = {f.name for f in dataclasses.fields(GPTConfig)}
        return GPTConfig(**{k: v for k, v in raw.items() if k in known})
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{ckpt_dir / STATE_FILE} holds no valid model config: {e}") from None


# -----------------------------------------------------------------------------
# Reading DeepSpeed's checkpoint files (which rank's shard is in which file:
# trainer/checkpoint/shards.py)


def load_checkpoint_file(path: Path) -> Any:
    """torch.load(weights_only=True), allowing exactly DeepSpeed's classes (see
    trainer/checkpoint/format.py safe_torch_load). A file that pickles anything else (which
    could run code on load) is refused with an ExportError."""
    try:
        return safe_torch_load(path, map_location="cpu", mmap=True)
    except CheckpointError as e:
        raise ExportError(str(e)) from None


def _file(tag_dir: Path, name: str) -> Path:
    path = tag_dir / name
    if not path.is_file():
        raise ExportError(f"{path} is missing: the checkpoint is incomplete")
    return path


def _optim_file(tag_dir: Path, dp_rank: int, mp_rank: int) -> Path:
    name = optim_states_file(dp_rank, mp_rank)
    if (tag_dir / f"bf16_{name}").is_file():
        return tag_dir / f"bf16_{name}"
    return _file(tag_dir, name)


def _has_optim_files(tag_dir: Path, mp_rank: int) -> bool:
    return any(tag_dir.glob(f"*{optim_states_file(0, mp_rank)}"))


def _optimizer_shards(tag_dir: Path, mp_rank: int, dp: Optional[int]) -> list[dict[str, Any]]:
    """The ZeRO optimizer state of each data-parallel rank of model-parallel rank mp_rank."""
    first = load_checkpoint_file(_optim_file(tag_dir, 0, mp_rank))["optimizer_state_dict"]
    count = first["partition_count"]  # one per group (ZeRO-1/2), or one int (ZeRO-3)
    count = max(count) if isinstance(count, list) else int(count)
    if dp is not None and count != dp:
        raise ExportError(
            f"{tag_dir} holds optimizer shards of data-parallel size {count}, but the run's "
            f"config gives {dp}"
        )
    rest = [
        load_checkpoint_file(_optim_file(tag_dir, d, mp_rank))["optimizer_state_dict"]
        for d in range(1, count)
    ]
    return [first, *rest]


def _fp32_from_zero12(
    shards: list[dict[str, Any]], param_shapes: list[dict[str, torch.Size]]
) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: a parameter is the concatenation, in data-parallel rank order, of its pieces in
    each rank's flat fp32 partition, located by that rank's param_slice_mappings."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for shard in shards:
        groups, mappings = shard["single_partition_of_fp32_groups"], shard["param_slice_mappings"]
        for flat, mapping in zip(groups, mappings):
            for name, fragment in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, fragment.start, fragment.numel))
    out = {}
    for shapes in param_shapes:
        for name, shape in shapes.items():
            flat = torch.cat(pieces.get(name, [torch.empty(0)]))
            if flat.numel() != shape.numel():
                raise ExportError(
                    f"parameter {name}: the optimizer shards hold {flat.numel()} values for "
                    f"shape {tuple(shape)}"
                )
            out[name] = flat.view(shape).clone()
    return out


def _fp32_from_zero3(tag_dir: Path, dp: Optional[int]) -> dict[str, torch.Tensor]:
    """ZeRO-3: rank r's flat fp32 groups hold, parameter after parameter in param_shapes order,
    elements [r * p, (r + 1) * p) of each, p = ceil(numel / dp), the last rank's zero-padded."""
    states = load_checkpoint_file(_file(tag_dir, zero3_model_states_file(0)))
    flats = [torch.cat(list(s["fp32_flat_groups"])) for s in _optimizer_shards(tag_dir, 0, dp)]
    world, offset, out = len(flats), 0, {}
    for shapes in states["param_shapes"]:
        for name, shape in shapes.items():
            part = math.ceil(shape.numel() / world)
            whole = torch.cat([flat.narrow(0, offset, part) for flat in flats])
            out[name] = whole[: shape.numel()].view(shape).clone()
            offset += part
    if offset != flats[0].numel():
        raise ExportError(
            f"{tag_dir}: the ZeRO-3 shards hold {flats[0].numel()} values per rank, "
            f"the parameters {offset}"
        )
    return out


def _model_parallel_rank(
    tag_dir: Path, mp_rank: int, dp: Optional[int]
) -> Optional[dict[str, torch.Tensor]]:
    """Model-parallel rank mp_rank's parameters under DeepSpeed's names: the fp32 master weights
    of the ZeRO-1/2 optimizer shards, else (ZeRO-0) the module state; None for a pipeline stage
    with ZeRO-0 (its weights are in the layer files)."""
    states = load_checkpoint_file(_file(tag_dir, model_states_file(mp_rank)))
    if _has_optim_files(tag_dir, mp_rank):
        return _fp32_from_zero12(_optimizer_shards(tag_dir, mp_rank, dp), states["param_shapes"])
    # ZeRO-0: with bf16 these are the bf16 weights (the fp32 master copy sits unnamed in the
    # optimizer state).
    return states["module"]


def _merge_tensor_parallel(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole tensors from the AutoTP shards of the tensor-parallel ranks, in rank order."""
    specs = tensor_parallel_config(len(shards))["partition_config"]["layer_specs"]
    out = {}
    for name, first in shards[0].items():
        dim = tensor_parallel_dim(name, specs)
        out[name] = first if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return out


def tensor_parallel_dim(name: str, specs: list[dict[str, Any]]) -> Optional[int]:
    """The dimension AutoTP splits parameter `name` along under `specs` (the layer specs of
    trainer/worker/parallel.py tensor_parallel_config), None when it is replicated. A spec
    matches a Linear's weight name (re.match, first match wins, as DeepSpeed does) and AutoTP
    replaces the whole Linear: a column split takes a slice of the rows of weight and bias, a
    row split a slice of the columns of the weight, and keeps the bias whole on every rank."""
    module, _, leaf = name.rpartition(".")
    for spec in specs:
        if any(re.match(pattern, f"{module}.weight") for pattern in spec["patterns"]):
            kind = spec["partition_type"]
            if kind == "column":
                return 0
            if kind == "row":
                return 1 if leaf == "weight" else None
            raise ExportError(f"parameter {name}: unknown AutoTP partition type {kind!r}")
    return None


def pipeline_names(cfg: GPTConfig) -> tuple[dict[str, str], dict[int, str]]:
    """(PipelineModule parameter name -> GPT state_dict name, layer index -> name prefix of the
    layer's module), for the layer list the trainer builds its PipelineModule from
    (trainer/worker/parallel.py pipeline_layers) and PipelineModule's naming: layer i is
    module "<i>", a tied layer "tied_modules.<key>" (built once; later layers with its key
    reuse it and have no file). A layer's parameters are the GPT's own, so identity gives
    their GPT names."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    from models.gpt import GPT

    with torch.device("meta"):
        gpt = GPT(cfg)
        gpt_name = {id(p): name for name, p in gpt.named_parameters()}
        names: dict[str, str] = {}
        prefixes: dict[int, str] = {}
        for index, layer in enumerate(pipeline_layers(gpt)):
            if isinstance(layer, TiedLayerSpec):
                prefix = f"tied_modules.{layer.key}"
                if prefix in prefixes.values():
                    continue
                module = layer.build()
            elif isinstance(layer, LayerSpec):
                prefix, module = str(index), layer.build()
            elif isinstance(layer, torch.nn.Module):
                prefix, module = str(index), layer
            else:
                continue  # a plain function: no parameters
            prefixes[index] = prefix
            for local, p in module.named_parameters():
                names[f"{prefix}.{local}"] = gpt_name[id(p)]
    return names, prefixes


def _merge_pipeline(
    cfg: GPTConfig, stages: list[Optional[dict[str, torch.Tensor]]], tag_dir: Path
) -> dict[str, torch.Tensor]:
    """The GPT state dict from the parameters of every pipeline stage, or (ZeRO-0) from the
    layer files. A tied module is on two stages: the first stage's copy is the one in use (the
    last stage holds the embedding module for its tied weight only, so its copy of a learned
    position table is never trained)."""
    names, prefixes = pipeline_names(cfg)
    if any(stage is None for stage in stages):
        stages = []
        for index, prefix in prefixes.items():
            layer = load_checkpoint_file(_file(tag_dir, layer_file(index)))
            stages.append({f"{prefix}.{local}": t for local, t in layer.items()})
    out: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, t in stage.items():
            if name not in names:
                raise ExportError(f"pipeline parameter {name} matches no layer of the model")
            out.setdefault(names[name], t)
    return out


def _trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    try:
        return read_trainer_state(ckpt_dir)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {ckpt_dir / STATE_FILE}: {_one_line(e)}") from None


def _consolidate(ckpt_dir: Path, state: dict[str, Any], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The fp32 weights of checkpoint ckpt_dir from its DeepSpeed files, for any ZeRO stage and
    any data x tensor, data x pipeline or data x tensor x pipeline layout (from the run's
    config; sequence-parallel ranks are data-parallel ones here). raygpt's tensor-parallel
    blocks of 3-D layouts split by AutoTP's specs, so one merge serves both."""
    tag_dir = ckpt_dir / "ds" / DS_TAG
    try:
        layout = ShardLayout.of(state.get("config", {}))
    except ValueError as e:
        raise ExportError(f"the checkpoint's config has no valid layout: {e}") from None
    if (tag_dir / zero3_model_states_file(0)).is_file():
        return _fp32_from_zero3(tag_dir, layout.dp)  # ZeRO-3 runs are data parallel only
    ranks = [_model_parallel_rank(tag_dir, m, layout.dp) for m in range(layout.model_parallel)]
    if layout.pp > 1 and layout.tp > 1:  # 3-D (ZeRO-1): model-parallel rank stage * tp + t
        tp = layout.tp
        ranks = [_merge_tensor_parallel(ranks[s * tp : (s + 1) * tp]) for s in range(layout.pp)]
    if layout.pp > 1:
        return _merge_pipeline(cfg, ranks, tag_dir)
    if layout.tp > 1:
        return _merge_tensor_parallel(ranks)
    return ranks[0]


def consolidated_state_dict(ckpt_dir: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The checkpoint's model config and its full fp32 state dict, loadable into GPT(config)
    with strict=True (with tied embeddings both wte.weight and lm_head.weight are present and
    are one tensor)."""
    ckpt_dir = Path(ckpt_dir)
    return _consolidated(ckpt_dir, _trainer_state(ckpt_dir))


def _consolidated(
    ckpt_dir: Path, state: dict[str, Any]
) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    cfg = _model_config(state, ckpt_dir)
    try:
        raw = _consolidate(ckpt_dir, state, cfg)
    except ExportError:
        raise
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
    expected = _state_shapes(cfg)
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        raise ExportError(
            f"checkpoint {ckpt_dir} does not match its model config: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, t in sd.items():
        if t.numel() == 0:
            raise ExportError(f"checkpoint {ckpt_dir}: tensor {name} is empty (not consolidated)")
        if t.shape != expected[name]:
            raise ExportError(
                f"checkpoint {ckpt_dir}: tensor {name} has shape {tuple(t.shape)}, the model "
                f"config gives {tuple(expected[name])} (a shard of another layout?)"
            )
    return cfg, sd


def _state_shapes(cfg: GPTConfig) -> dict[str, torch.Size]:
    """The shapes of GPT(cfg).state_dict(), from a weightless (meta device) instance."""
    from models.gpt import GPT

    with torch.device("meta"):
        return {name: t.shape for name, t in GPT(cfg).state_dict().items()}


# -----------------------------------------------------------------------------
# Writing the Hugging Face directory


def _tokenizer_source(data_dir: Optional[str]) -> tuple[Optional[str], str]:
    """(URI of the dataset's tokenizer.json, "") or (None, why not)."""
    if not data_dir:
        return None, "the checkpoint's config names no data.out_dir"
    try:
        if not storage.is_dir(data_dir):
            return None, f"the dataset dir {data_dir} (data.out_dir) is gone"
        name = "tokenizer.json"
        try:
            manifest = read_manifest(data_dir)
            if manifest is not None:
                name = manifest.tokenizer.file
        except (OSError, ValueError):
            pass  # no readable manifest: try the default file name
        path = storage.join(data_dir, name)
        if not storage.is_file(path):
            return None, f"dataset dir {data_dir} has no {name}"
    except OSError as e:
        return None, f"the dataset dir {data_dir} cannot be read ({storage.one_line(e)})"
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


def check_target(out_dir: str | Path) -> str:
    """The export target as an absolute URI, once it is known to be writable and new (absent
    or an empty directory); ExportError (one line naming it) otherwise. Writes nothing."""
    out = storage.absolute(str(out_dir))
    try:
        storage.check_writable(out, "export target")
        if storage.is_file(out) or storage.listdir(out):
            raise ExportError(
                f"export target ({out}) exists and is not empty: choose a new output directory"
            )
    except storage.StorageError as e:
        raise ExportError(str(e)) from None
    return out


def export(ckpt_dir: str | Path, out_dir: str | Path, dtype: str = "fp32") -> str:
    """Exports checkpoint ckpt_dir as an HF model directory out_dir (absent or empty). Either
    may be a storage URI: a remote checkpoint is read from a local copy, a remote target gets
    the finished directory uploaded."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} must be one of {sorted(DTYPES)}")
    out = check_target(out_dir)
    if storage.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="raygpt-export-") as tmp:
            _export_local(str(ckpt_dir), Path(tmp) / "model", dtype)
            storage.upload(Path(tmp) / "model", out)
        return out
    return str(_export_local(str(ckpt_dir), Path(out), dtype))


def _export_local(ckpt: str, out_dir: Path, dtype: str) -> Path:
    with storage.local_copy(ckpt) as ckpt_dir:
        return _export_from(ckpt_dir, out_dir, dtype)


def _export_from(ckpt_dir: Path, out_dir: Path, dtype: str) -> Path:
    state = _trainer_state(ckpt_dir)
    cfg, sd = _consolidated(ckpt_dir, state)
    try:
        hf_config(cfg)
    except ValueError as e:
        raise ExportError(str(e)) from None
    tokenizer_file, why = _tokenizer_source(state.get("config", {}).get("data", {}).get("out_dir"))
    if tokenizer_file is None:
        print(f"warning: exporting the model without a tokenizer: {why}", file=sys.stderr)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with storage.local_copy(tokenizer_file) if tokenizer_file else nullcontext() as tok:
            write_model_dir(tmp, cfg, sd, dtype=dtype, tokenizer_file=tok)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); os.replace cannot replace a directory
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line (with the usage) and exit status 2,
    like every other bad input of this command."""

    def error(self, message: str):
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        self.exit(2, f"error: {message} (usage: {usage})\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = _Parser(
        prog="python -m trainer.export",
        description="Export a raygpt checkpoint as a Hugging Face model directory.",
    )
    parser.add_argument(
        "path", help="a run directory or a checkpoint_* directory (a path, s3:// or gs://)"
    )
    parser.add_argument("out_dir", help="new (or empty) output directory (a path, s3:// or gs://)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage error (2, one line printed) or --help (0)
        return int(e.code or 0)
    try:
        check_target(args.out_dir)  # up front: before the checkpoint is looked for and read
        ckpt = find_checkpoint(args.path)
        step = read_trainer_state(ckpt).get("step")
        out = export(ckpt, args.out_dir, args.dtype)
    except (ExportError, OSError, ValueError) as e:
        from data_pipeline.failures import describe

        safe = f"the checkpoint is untouched; {args.out_dir} may hold a partial export: delete it"
        line = describe(e, safe=safe, where=args.out_dir) or str(e)
        print(f"error: {' '.join(line.split()) or type(e).__name__}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} (step {step}) to {out} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
