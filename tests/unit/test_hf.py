"""Hugging Face conversion (models/hf.py), the export writer and init_from, without Ray."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from models import GPT, GPTConfig
from models.gpt import shape_of
from models.hf import from_hf, hf_config, to_hf_state_dict
from trainer.export import write_model_dir
from trainer.init_from import check_hf_config, load_hf_weights

GPT2 = dict(
    vocab_size=97,
    block_size=32,
    n_layer=2,
    n_head=4,
    d_model=64,
    pos_embedding="learned",
    norm="layernorm",
    mlp="gelu",
    bias=True,
    norm_eps=1e-5,
)
LLAMA = dict(
    vocab_size=97,
    block_size=32,
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    d_model=64,
    pos_embedding="rope",
    rope_theta=500.0,
    norm="rmsnorm",
    norm_eps=1e-6,
    mlp="swiglu",
    bias=False,
    tie_embeddings=False,
)
VARIANTS = {
    "gpt2": GPT2,
    "gpt2-untied-dff": {**GPT2, "tie_embeddings": False, "d_ff": 96},
    "llama-gqa-untied": LLAMA,
    "llama-tied-bias-mha": {**LLAMA, "tie_embeddings": True, "bias": True, "n_kv_head": None},
}
variants = pytest.mark.parametrize("kwargs", list(VARIANTS.values()), ids=list(VARIANTS))


def randomized(seed: int = 0, **kwargs) -> GPT:
    """Large random weights (norm gains and biases too) so that mapping mistakes show up."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**kwargs))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def tokens(B: int = 2, T: int = 20) -> torch.Tensor:
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(1))


@variants
def test_round_trip_is_exact(kwargs):
    model = randomized(**kwargs)
    cfg = model.config
    hf = to_hf_state_dict(model.state_dict(), cfg)
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in hf.values())
    if cfg.tie_embeddings:
        assert "lm_head.weight" not in hf  # stored once, as the embedding
    back_cfg, back = from_hf(hf_config(cfg), hf)
    assert shape_of(back_cfg) == shape_of(cfg)
    assert (back_cfg.rope_theta, back_cfg.norm_eps) == (cfg.rope_theta, cfg.norm_eps)
    ours = model.state_dict()
    assert back.keys() == ours.keys()
    for name, t in ours.items():
        assert torch.equal(back[name], t), name
    fresh = GPT(back_cfg)
    fresh.load_state_dict(back, strict=True)
    assert torch.equal(fresh.eval()(tokens())[0], model(tokens())[0])


def test_tied_export_accepts_either_name():
    model = randomized(**GPT2)
    sd = model.state_dict()
    ref = to_hf_state_dict(sd, model.config)
    for drop in ("wte.weight", "lm_head.weight"):
        got = to_hf_state_dict({k: v for k, v in sd.items() if k != drop}, model.config)
        assert got.keys() == ref.keys()
        assert torch.equal(got["transformer.wte.weight"], ref["transformer.wte.weight"])


def test_missing_or_unknown_keys_raise():
    model = randomized(**LLAMA)
    sd = dict(model.state_dict())
    del sd["blocks.1.mlp.gate.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 key.*blocks\.1\.mlp\.gate\.weight"):
        to_hf_state_dict(sd, model.config)
    hf = to_hf_state_dict(model.state_dict(), model.config)
    hf["model.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unknown key.*extra"):
        from_hf(hf_config(model.config), hf)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {**GPT2, "pos_embedding": "rope"},
            r"pos_embedding 'rope' is not representable as LlamaForCausalLM: "
            r"norm 'layernorm' \(needs 'rmsnorm'\); mlp 'gelu' \(needs 'swiglu'\)",
        ),
        ({**LLAMA, "mlp": "gelu"}, r"LlamaForCausalLM: mlp 'gelu' \(needs 'swiglu'\)$"),
        ({**GPT2, "norm": "rmsnorm"}, r"GPT2LMHeadModel: norm 'rmsnorm' \(needs 'layernorm'\)$"),
        ({**GPT2, "bias": False}, r"GPT2LMHeadModel: bias False \(needs True\)$"),
        ({**GPT2, "n_kv_head": 2}, r"GPT2LMHeadModel: n_kv_head 2 \(needs n_head 4: no GQA\)$"),
    ],
)
def test_unsupported_combination_raises(overrides, match):
    cfg = GPTConfig(**overrides)
    with pytest.raises(ValueError, match=match):
        hf_config(cfg)
    with pytest.raises(ValueError, match=match):
        to_hf_state_dict(GPT(cfg).state_dict(), cfg)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "mistral"}, r"model_type 'mistral' is not supported"),
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, r"rope_type 'llama3'"),
        ({"attention_bias": True}, r"attention_bias \(True\) != mlp_bias \(False\)"),
    ],
)
def test_from_hf_rejects_what_we_cannot_reproduce(change, match):
    model = randomized(**LLAMA)
    hf = to_hf_state_dict(model.state_dict(), model.config)
    with pytest.raises(ValueError, match=match):
        from_hf({**hf_config(model.config), **change}, hf)


def test_from_hf_reads_hub_style_gpt2_keys():
    """Hub gpt2 checkpoints have no "transformer." prefix and carry attn.bias mask buffers."""
    model = randomized(**GPT2)
    hf = to_hf_state_dict(model.state_dict(), model.config)
    hub = {k.removeprefix("transformer."): v for k, v in hf.items()}
    hub["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    _, back = from_hf(hf_config(model.config), hub)
    for name, t in model.state_dict().items():
        assert torch.equal(back[name], t), name


@variants
def test_transformers_loads_the_export_with_equal_logits(kwargs, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = randomized(**kwargs)
    write_model_dir(tmp_path, model.config, model.state_dict())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    expected_cls = "GPT2LMHeadModel" if kwargs["pos_embedding"] == "learned" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_cls
    head, emb = hf.get_output_embeddings().weight, hf.get_input_embeddings().weight
    assert (head.data_ptr() == emb.data_ptr()) == model.config.tie_embeddings
    idx = tokens()
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_bf16_export(tmp_path):
    from safetensors.torch import load_file

    model = randomized(**LLAMA)
    write_model_dir(tmp_path, model.config, model.state_dict(), dtype="bf16")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert torch.equal(
        tensors["model.embed_tokens.weight"], model.wte.weight.detach().to(torch.bfloat16)
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert not (tmp_path / "tokenizer.json").exists()  # none given: model only


@pytest.mark.parametrize("kwargs", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_load_hf_weights_round_trip(kwargs, tmp_path):
    source = randomized(seed=0, **kwargs)
    write_model_dir(tmp_path, source.config, source.state_dict())
    target = randomized(seed=5, **kwargs)
    idx = tokens()
    assert not torch.equal(target(idx)[0], source(idx)[0])
    load_hf_weights(target, str(tmp_path))
    assert torch.equal(target(idx)[0], source(idx)[0])
    if source.config.tie_embeddings:
        assert target.lm_head.weight is target.wte.weight


@pytest.mark.parametrize(
    "change, match",
    [
        ({"n_layer": 3}, r"model\.n_layer is 3 but the Hugging Face checkpoint has 2"),
        ({"d_ff": 128}, r"model\.d_ff is 128 but the Hugging Face checkpoint has 192"),
        ({"n_kv_head": 4}, r"model\.n_kv_head is 4 but the Hugging Face checkpoint has 2"),
        ({"vocab_size": 98}, r"model\.vocab_size is 98 but the Hugging Face checkpoint has 97"),
        ({"tie_embeddings": True}, r"model\.tie_embeddings is True but .* has False"),
    ],
)
def test_load_hf_weights_shape_mismatch(change, match, tmp_path):
    source = randomized(**LLAMA)
    write_model_dir(tmp_path, source.config, source.state_dict())
    target = GPT(GPTConfig(**{**LLAMA, **change}))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=match) as info:
        load_hf_weights(target, str(tmp_path))
    assert "\n" not in str(info.value)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing was loaded


def test_block_size_counts_only_for_learned_positions(tmp_path):
    gpt2 = randomized(**GPT2)
    write_model_dir(tmp_path / "g", gpt2.config, gpt2.state_dict())
    with pytest.raises(ValueError, match=r"model\.block_size is 64 but .* has 32"):
        check_hf_config(GPTConfig(**{**GPT2, "block_size": 64}), str(tmp_path / "g"))
    llama = randomized(**LLAMA)
    write_model_dir(tmp_path / "l", llama.config, llama.state_dict())
    longer = GPT(GPTConfig(**{**LLAMA, "block_size": 64}))  # RoPE: no weight depends on it
    load_hf_weights(longer, str(tmp_path / "l"))
    assert torch.equal(longer.wte.weight, llama.wte.weight)


def test_init_from_missing_dir(tmp_path):
    with pytest.raises(
        ValueError, match=r"nope does not exist \(expected a Hugging Face model directory"
    ):
        load_hf_weights(GPT(GPTConfig(**GPT2)), str(tmp_path / "nope"))


def fake_checkpoint(ckpt, model: GPT, *, complete: bool = True):
    """A ZeRO-0 checkpoint layout: rank 0's module state holds the whole model."""
    (ckpt / "ds" / "ds").mkdir(parents=True)
    torch.save({"module": model.state_dict()}, ckpt / "ds" / "ds" / "mp_rank_00_model_states.pt")
    if complete:
        config = {"model": dataclasses.asdict(model.config), "data": {"out_dir": "/gone"}}
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "config": config}))
    return ckpt


def test_find_checkpoint_and_zero0_consolidation(tmp_path, capsys):
    from trainer.export import ExportError, consolidated_state_dict, export, find_checkpoint

    model = randomized(**GPT2)
    fake_checkpoint(tmp_path / "checkpoint_00000002", model)
    fake_checkpoint(tmp_path / "checkpoint_00000010", model)
    fake_checkpoint(tmp_path / "checkpoint_00000020", model, complete=False)  # being written
    ckpt = Path(find_checkpoint(tmp_path))
    assert ckpt.name == "checkpoint_00000010"
    assert find_checkpoint(ckpt) == str(ckpt)
    with pytest.raises(ExportError, match="no complete checkpoint_"):
        find_checkpoint(tmp_path / "checkpoint_00000020" / "ds")

    cfg, sd = consolidated_state_dict(ckpt)
    assert cfg == model.config
    for name, t in model.state_dict().items():
        assert torch.equal(sd[name], t), name

    out = Path(export(ckpt, tmp_path / "hf"))
    assert "warning: exporting the model without a tokenizer" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    target = randomized(seed=9, **GPT2)
    load_hf_weights(target, str(out))
    assert torch.equal(target(tokens())[0], model(tokens())[0])
