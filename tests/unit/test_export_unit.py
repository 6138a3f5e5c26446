"""trainer/export.py without Ray: safe loading of checkpoint files, the AutoTP split rule and
the pipeline layer names (the e2e tests export real checkpoints of every layout)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hostile import RunsCodeOnLoad

from models.gpt import GPT, GPTConfig
from trainer.export import (
    ExportError,
    consolidated_state_dict,
    load_checkpoint_file,
    pipeline_names,
    tensor_parallel_dim,
)
from trainer.worker.parallel import tensor_parallel_config

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16)


def test_a_pickled_callable_is_refused_not_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": RunsCodeOnLoad(marker)}, path)

    with pytest.raises(ExportError, match=r"refusing to load .*_run_on_load"):
        load_checkpoint_file(path)
    assert not marker.exists()

    # The file really is hostile: an unrestricted load runs the code.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_export_refuses_a_hostile_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    model = GPT(GPTConfig(**TINY))
    ckpt = tmp_path / "checkpoint_00000001"
    (ckpt / "ds" / "ds").mkdir(parents=True)
    states = {"module": model.state_dict(), "x": RunsCodeOnLoad(marker)}
    torch.save(states, ckpt / "ds" / "ds" / "mp_rank_00_model_states.pt")
    config = {"model": dataclasses.asdict(model.config)}
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "config": config}))

    with pytest.raises(ExportError, match="refusing to load"):
        consolidated_state_dict(ckpt)
    assert not marker.exists()


def test_deepspeed_optimizer_types_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = {
        "loss_scaler": LossScaler(scale=1.0),
        "zero_stage": ZeroStageEnum.optimizer_states,
        "param_slice_mappings": [{"wte.weight": fragment_address(numel=4, start=2)}],
        "single_partition_of_fp32_groups": [torch.arange(8.0)],
    }
    torch.save({"optimizer_state_dict": state}, path)
    got = load_checkpoint_file(path)["optimizer_state_dict"]
    assert got["zero_stage"] == ZeroStageEnum.optimizer_states
    assert got["loss_scaler"].cur_scale == 1.0
    assert got["param_slice_mappings"][0]["wte.weight"] == fragment_address(numel=4, start=2)
    assert torch.equal(got["single_partition_of_fp32_groups"][0], torch.arange(8.0))


@pytest.mark.parametrize(
    "name, dim",
    [
        ("blocks.0.attn.q_proj.weight", 0),
        ("blocks.0.attn.q_proj.bias", 0),
        ("blocks.1.attn.v_proj.weight", 0),
        ("blocks.1.mlp.gate.weight", 0),
        ("blocks.1.mlp.up.bias", 0),
        ("blocks.0.attn.o_proj.weight", 1),
        ("blocks.0.attn.o_proj.bias", None),
        ("blocks.0.mlp.down.weight", 1),
        ("blocks.0.mlp.down.bias", None),
        ("blocks.0.ln_1.weight", None),
        ("wte.weight", None),
        ("lm_head.weight", None),
    ],
)
def test_tensor_parallel_dim_follows_the_training_specs(name, dim):
    specs = tensor_parallel_config(2)["partition_config"]["layer_specs"]
    assert tensor_parallel_dim(name, specs) == dim


@pytest.mark.parametrize("tie", [True, False])
def test_pipeline_names_cover_the_model(tie):
    cfg = GPTConfig(**TINY, tie_embeddings=tie)
    names, prefixes = pipeline_names(cfg)
    head = {} if tie else {4: "4"}
    first = "tied_modules.embed" if tie else "0"
    assert prefixes == {0: first, 1: "1", 2: "2", 3: "3", **head}
    assert names[f"{first}.wte.weight"] == "wte.weight"
    assert names[f"{first}.wpe.weight"] == "wpe.weight"
    assert names["1.attn.q_proj.weight"] == "blocks.0.attn.q_proj.weight"
    assert names["2.mlp.down.bias"] == "blocks.1.mlp.down.bias"
    assert names["3.ln_f.weight"] == "ln_f.weight"
    keys = set(GPT(cfg).state_dict()) - ({"lm_head.weight"} if tie else set())
    assert sorted(names.values()) == sorted(keys)


def fake_checkpoint(ckpt: Path, model: GPT, files: dict[str, dict], *, tp: int, pp: int) -> Path:
    """A ZeRO-0 checkpoint of the given layout, with the files DeepSpeed would write."""
    (ckpt / "ds" / "ds").mkdir(parents=True)
    for name, content in files.items():
        torch.save(content, ckpt / "ds" / "ds" / name)
    config = {
        "model": dataclasses.asdict(model.config),
        "parallel": {"zero_stage": 0, "tensor_parallel": tp, "pipeline_parallel": pp},
        "cluster": {"num_workers": tp * pp},
    }
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "config": config}))
    return ckpt


COLUMN = ("q_proj.weight", "q_proj.bias", "k_proj.", "v_proj.", "up.")
ROW = ("o_proj.weight", "down.weight")


def test_zero0_tensor_parallel_shards_are_concatenated(tmp_path):
    model = GPT(GPTConfig(**TINY))
    sd = model.state_dict()
    shards = [{}, {}]
    for name, t in sd.items():
        dim = 0 if any(k in name for k in COLUMN) else 1 if name.endswith(ROW) else None
        for rank, shard in enumerate(shards):
            shard[name] = t if dim is None else t.chunk(2, dim=dim)[rank].clone()
    files = {f"mp_rank_{r:02d}_model_states.pt": {"module": s} for r, s in enumerate(shards)}
    ckpt = fake_checkpoint(tmp_path / "tp", model, files, tp=2, pp=1)
    _, got = consolidated_state_dict(ckpt)
    for name, t in sd.items():
        assert torch.equal(got[name], t), name

    # The same shards read as a tensor-parallel-1 run: caught by shape, not exported.
    ckpt = fake_checkpoint(tmp_path / "tp1", model, files, tp=1, pp=1)
    with pytest.raises(ExportError, match=r"attn\.q_proj\.weight has shape \(8, 16\)"):
        consolidated_state_dict(ckpt)


def test_zero0_pipeline_layers_are_renamed(tmp_path):
    model = GPT(GPTConfig(**TINY))
    sd = model.state_dict()
    layers = {0: ("wte.", "wpe."), 1: ("blocks.0.",), 2: ("blocks.1.",), 3: ("ln_f.",)}
    files = {f"mp_rank_{r:02d}_model_states.pt": {"module": None} for r in range(2)}
    for index, prefixes in layers.items():
        strip = prefixes[0] if index in (1, 2) else ""
        layer = {k.removeprefix(strip): t for k, t in sd.items() if k.startswith(prefixes)}
        files[f"layer_{index:02d}-model_states.pt"] = layer
    ckpt = fake_checkpoint(tmp_path / "pp", model, files, tp=1, pp=2)
    _, got = consolidated_state_dict(ckpt)
    for name, t in sd.items():
        assert torch.equal(got[name], t), name
