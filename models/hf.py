"""Hugging Face format conversion, both ways, in plain PyTorch (no transformers import).

Two families are representable:
  * GPT2LMHeadModel:  pos_embedding "learned", norm "layernorm", mlp "gelu" (tanh), bias, no GQA.
    HF GPT-2 uses Conv1D layers (weight is (in, out), the transpose of nn.Linear's) and one
    fused c_attn projection holding q, k and v stacked along its output dimension.
  * LlamaForCausalLM: pos_embedding "rope", norm "rmsnorm", mlp "swiglu"; GQA; bias optional
    (attention_bias and mlp_bias together). Same (out, in) Linear layout as ours.

Tied embeddings: our state_dict holds the shared tensor under both wte.weight and lm_head.weight;
the HF files hold it once (the embedding) and transformers re-ties lm_head on load.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from models.gpt import GPTConfig

Tensor = torch.Tensor

# HF buffers that older checkpoints store and that carry no weights.
_IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _family(cfg: GPTConfig) -> str:
    """'gpt2' or 'llama'; ValueError naming what neither HF architecture can represent."""
    if cfg.pos_embedding == "learned":
        arch, family = "GPT2LMHeadModel", "gpt2"
        needs: dict[str, Any] = {"norm": "layernorm", "mlp": "gelu", "bias": True}
    else:
        arch, family = "LlamaForCausalLM", "llama"
        needs = {"norm": "rmsnorm", "mlp": "swiglu"}
    problems = [
        f"{k} {getattr(cfg, k)!r} (needs {v!r})" for k, v in needs.items() if getattr(cfg, k) != v
    ]
    if family == "gpt2" and cfg.kv_heads != cfg.n_head:
        problems.append(f"n_kv_head {cfg.kv_heads} (needs n_head {cfg.n_head}: no GQA)")
    if problems:
        raise ValueError(
            f"model with pos_embedding {cfg.pos_embedding!r} is not representable as "
            f"{arch}: {'; '.join(problems)}"
        )
    return family


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """The config.json of the equivalent HF model (token ids and dtype are added by the caller)."""
    if _family(cfg) == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size,
            "n_ctx": cfg.block_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.ffn_dim,
            # nn.GELU("tanh") is HF's gelu_new, the exact nn.GELU() its gelu
            "activation_function": GELU_TO_HF[cfg.gelu_approximate],
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "initializer_range": cfg.init_std,
            "scale_attn_weights": True,
            "tie_word_embeddings": cfg.tie_embeddings,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta, >= 5 reads rope_parameters (and converts the other)
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


# -----------------------------------------------------------------------------
# Key mapping: (our key, HF key, transpose) for every tensor except GPT-2's fused c_attn


def _pairs(cfg: GPTConfig, family: str) -> list[tuple[str, str, bool]]:
    pairs: list[tuple[str, str, bool]] = []

    def linear(ours: str, theirs: str, transpose: bool, bias: bool) -> None:
        pairs.append((f"{ours}.weight", f"{theirs}.weight", transpose))
        if bias:
            pairs.append((f"{ours}.bias", f"{theirs}.bias", False))

    if family == "gpt2":
        pairs.append(("wte.weight", "transformer.wte.weight", False))
        pairs.append(("wpe.weight", "transformer.wpe.weight", False))
        for i in range(cfg.n_layer):
            o, t = f"blocks.{i}", f"transformer.h.{i}"
            linear(f"{o}.ln_1", f"{t}.ln_1", False, True)
            linear(f"{o}.attn.o_proj", f"{t}.attn.c_proj", True, True)
            linear(f"{o}.ln_2", f"{t}.ln_2", False, True)
            linear(f"{o}.mlp.up", f"{t}.mlp.c_fc", True, True)
            linear(f"{o}.mlp.down", f"{t}.mlp.c_proj", True, True)
        linear("ln_f", "transformer.ln_f", False, True)
    else:
        pairs.append(("wte.weight", "model.embed_tokens.weight", False))
        for i in range(cfg.n_layer):
            o, t = f"blocks.{i}", f"model.layers.{i}"
            linear(f"{o}.ln_1", f"{t}.input_layernorm", False, False)
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear(f"{o}.attn.{proj}", f"{t}.self_attn.{proj}", False, cfg.bias)
            linear(f"{o}.ln_2", f"{t}.post_attention_layernorm", False, False)
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                linear(f"{o}.mlp.{ours}", f"{t}.mlp.{theirs}", False, cfg.bias)
        linear("ln_f", "model.norm", False, False)
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", False))
    return pairs


def _qkv_names(i: int) -> tuple[list[str], str]:
    ours = [f"blocks.{i}.attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    return ours, f"transformer.h.{i}.attn.c_attn"


def _our_keys(cfg: GPTConfig, family: str) -> set[str]:
    keys = {ours for ours, _, _ in _pairs(cfg, family)}
    if family == "gpt2":
        for i in range(cfg.n_layer):
            for name in _qkv_names(i)[0]:
                keys |= {f"{name}.weight", f"{name}.bias"}
    return keys


def _out(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.detach()
    return (t.to(dtype) if t.is_floating_point() else t).contiguous()


def to_hf_state_dict(
    state_dict: dict[str, Tensor], cfg: GPTConfig, dtype: Optional[torch.dtype] = None
) -> dict[str, Tensor]:
    """Our GPT state_dict -> the HF model's, as independent contiguous tensors (fp32 or dtype).

    With tied embeddings either wte.weight or lm_head.weight may be missing (a consolidated
    checkpoint can keep just one name for the shared tensor); the HF dict holds it once.
    """
    family = _family(cfg)
    dtype = dtype or torch.float32
    sd = dict(state_dict)
    if cfg.tie_embeddings:
        shared = sd.get("wte.weight", sd.get("lm_head.weight"))
        if shared is not None:
            sd["wte.weight"] = shared
        sd.pop("lm_head.weight", None)
    expected = _our_keys(cfg, family)
    missing = sorted(expected - sd.keys())
    if missing:
        raise ValueError(f"state dict lacks {len(missing)} key(s) of the model: {missing[:5]}")
    unexpected = sorted(k for k in sd.keys() - expected if "rotary" not in k)
    if unexpected:
        raise ValueError(f"state dict has {len(unexpected)} unknown key(s): {unexpected[:5]}")

    out: dict[str, Tensor] = {}
    for ours, theirs, transpose in _pairs(cfg, family):
        t = sd[ours]
        out[theirs] = _out(t.t() if transpose else t, dtype)
    if family == "gpt2":
        for i in range(cfg.n_layer):
            names, fused = _qkv_names(i)
            weight = torch.cat([sd[f"{n}.weight"] for n in names], dim=0)  # (3C, C)
            out[f"{fused}.weight"] = _out(weight.t(), dtype)  # Conv1D: (C, 3C)
            out[f"{fused}.bias"] = _out(torch.cat([sd[f"{n}.bias"] for n in names]), dtype)
    return out


# -----------------------------------------------------------------------------
# HF -> ours


def _get(config: dict[str, Any], key: str, default: Any) -> Any:
    value = config.get(key)
    return default if value is None else value


def _rope_theta(config: dict[str, Any]) -> float:
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if params:
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type != "default":
                raise ValueError(f"{key} rope_type {rope_type!r} is not supported (only 'default')")
            if params.get("rope_theta") is not None:
                return float(params["rope_theta"])
    return float(_get(config, "rope_theta", 10000.0))


GELU_TO_HF = {"tanh": "gelu_new", "none": "gelu"}
GELU_FROM_HF = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def config_from_hf(config: dict[str, Any]) -> GPTConfig:
    """The GPTConfig of an HF config.json dict (HF defaults for absent keys); ValueError for
    settings our GPT cannot reproduce."""
    model_type = config.get("model_type")
    if model_type == "gpt2":
        act = _get(config, "activation_function", "gelu_new")
        if act not in GELU_FROM_HF:
            raise ValueError(
                f"activation_function {act!r} is not supported (needs one of {sorted(GELU_FROM_HF)})"
            )
        for key, ok in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("reorder_and_upcast_attn", False),
        ):
            if _get(config, key, ok) != ok:
                raise ValueError(f"{key} {config[key]!r} is not supported (needs {ok!r})")
        d_model = int(_get(config, "n_embd", 768))
        dropout = float(_get(config, "resid_pdrop", 0.0))
        return GPTConfig(
            name="hf-gpt2",
            vocab_size=int(_get(config, "vocab_size", 50257)),
            block_size=int(_get(config, "n_positions", 1024)),
            n_layer=int(_get(config, "n_layer", 12)),
            n_head=int(_get(config, "n_head", 12)),
            d_model=d_model,
            d_ff=int(_get(config, "n_inner", 4 * d_model)),
            pos_embedding="learned",
            norm="layernorm",
            norm_eps=float(_get(config, "layer_norm_epsilon", 1e-5)),
            mlp="gelu",
            gelu_approximate=GELU_FROM_HF[act],
            bias=True,
            tie_embeddings=bool(_get(config, "tie_word_embeddings", True)),
            dropout=dropout,
            init_std=float(_get(config, "initializer_range", 0.02)),
        )
    if model_type == "llama":
        act = _get(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (needs 'silu')")
        attention_bias = bool(_get(config, "attention_bias", False))
        mlp_bias = bool(_get(config, "mlp_bias", False))
        if attention_bias != mlp_bias:
            raise ValueError(
                f"attention_bias ({attention_bias}) != mlp_bias ({mlp_bias}) is not supported"
            )
        d_model = int(_get(config, "hidden_size", 4096))
        n_head = int(_get(config, "num_attention_heads", 32))
        head_dim = int(_get(config, "head_dim", d_model // n_head))
        if head_dim * n_head != d_model:
            raise ValueError(
                f"head_dim ({head_dim}) * num_attention_heads ({n_head}) != hidden_size "
                f"({d_model}) is not supported"
            )
        return GPTConfig(
            name="hf-llama",
            vocab_size=int(_get(config, "vocab_size", 32000)),
            block_size=int(_get(config, "max_position_embeddings", 2048)),
            n_layer=int(_get(config, "num_hidden_layers", 32)),
            n_head=n_head,
            n_kv_head=int(_get(config, "num_key_value_heads", n_head)),
            d_model=d_model,
            d_ff=int(_get(config, "intermediate_size", 11008)),
            pos_embedding="rope",
            rope_theta=_rope_theta(config),
            norm="rmsnorm",
            norm_eps=float(_get(config, "rms_norm_eps", 1e-6)),
            mlp="swiglu",
            bias=attention_bias,
            tie_embeddings=bool(_get(config, "tie_word_embeddings", False)),
            dropout=float(_get(config, "attention_dropout", 0.0)),
            init_std=float(_get(config, "initializer_range", 0.02)),
        )
    raise ValueError(f"model_type {model_type!r} is not supported (only 'gpt2' and 'llama')")


def from_hf(
    config: dict[str, Any], state_dict: dict[str, Tensor]
) -> tuple[GPTConfig, dict[str, Tensor]]:
    """An HF config.json dict + state dict -> (GPTConfig, our state_dict), tensors as given.

    Accepts GPT-2 keys with or without the "transformer." prefix (Hub checkpoints of gpt2 have
    none). With tied embeddings the result maps wte.weight and lm_head.weight to one tensor,
    which is what GPT.state_dict() holds, so load_state_dict(strict=True) accepts it.
    """
    cfg = config_from_hf(config)
    family = _family(cfg)
    sd = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_HF_SUFFIXES)}
    if family == "gpt2" and not any(k.startswith("transformer.") for k in sd):
        sd = {(k if k.startswith("lm_head.") else f"transformer.{k}"): v for k, v in sd.items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # a copy of the embedding when present

    expected = {theirs for _, theirs, _ in _pairs(cfg, family)}
    if family == "gpt2":
        for i in range(cfg.n_layer):
            fused = _qkv_names(i)[1]
            expected |= {f"{fused}.weight", f"{fused}.bias"}
    missing = sorted(expected - sd.keys())
    if missing:
        raise ValueError(f"HF state dict lacks {len(missing)} key(s): {missing[:5]}")
    unexpected = sorted(sd.keys() - expected)
    if unexpected:
        raise ValueError(f"HF state dict has {len(unexpected)} unknown key(s): {unexpected[:5]}")

    out: dict[str, Tensor] = {}
    for ours, theirs, transpose in _pairs(cfg, family):
        t = sd[theirs]
        out[ours] = t.t().contiguous() if transpose else t
    if family == "gpt2":
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        sizes = [q_dim, kv_dim, kv_dim]
        for i in range(cfg.n_layer):
            names, fused = _qkv_names(i)
            weights = sd[f"{fused}.weight"].t().split(sizes, dim=0)  # (C, 3C) -> 3 x (out, C)
            biases = sd[f"{fused}.bias"].split(sizes, dim=0)
            for name, w, b in zip(names, weights, biases, strict=True):
                out[f"{name}.weight"] = w.contiguous()
                out[f"{name}.bias"] = b.contiguous()
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    for ours, t in out.items():
        _check_shape(ours, t, cfg)
    return cfg, out


def _check_shape(name: str, t: Tensor, cfg: GPTConfig) -> None:
    """Catches a config.json that disagrees with its own weights, naming the tensor."""
    d, v = cfg.d_model, cfg.vocab_size
    q, kv, f = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_dim
    expected = {
        "wte.weight": (v, d),
        "lm_head.weight": (v, d),
        "wpe.weight": (cfg.block_size, d),
        "attn.q_proj.weight": (q, d),
        "attn.k_proj.weight": (kv, d),
        "attn.v_proj.weight": (kv, d),
        "attn.o_proj.weight": (d, q),
        "mlp.gate.weight": (f, d),
        "mlp.up.weight": (f, d),
        "mlp.down.weight": (d, f),
    }
    key = name if name in expected else name.split(".", 2)[-1]
    shape = expected.get(key)
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(
            f"HF tensor for {name} has shape {tuple(t.shape)}, config.json implies {shape}"
        )


__all__ = ["config_from_hf", "from_hf", "hf_config", "to_hf_state_dict"]
