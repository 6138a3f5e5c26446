"""The model's settings (`cfg.model`): GPTConfig and the one list of shape fields.

Torch-free, so the config rules (trainer/config.py) and the data pipeline can read a model's
shape without importing torch; models/gpt.py builds the model from it.
"""

import math
from dataclasses import dataclass
from typing import Optional

_POS_EMBEDDINGS = ("learned", "rope")
_NORMS = ("layernorm", "rmsnorm")
_MLPS = ("gelu", "swiglu")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} ({value!r}) must be one of {choices}")


def tristate(name: str, value) -> bool | str:
    """A true | false | "auto" setting as True, False or "auto": a bool given in code, or the
    string an OmegaConf str field makes of it ("True", "true", "auto"). Dataclasses type such
    fields str (OmegaConf takes no unions) and hold the normalised value."""
    if isinstance(value, bool):
        return value
    out = {"true": True, "false": False, "auto": "auto"}.get(str(value).lower())
    if out is None:
        raise ValueError(f"{name} ({value!r}) must be true, false or 'auto'")
    return out


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    name: str = "custom"
    vocab_size: int = 8192
    block_size: int = 256  # max context length
    n_layer: int = 6
    n_head: int = 8
    # Optional[...] rather than "int | None": OmegaConf structured configs need typing.Optional.
    n_kv_head: Optional[int] = None
    d_model: int = 256
    d_ff: Optional[int] = None
    pos_embedding: str = "learned"  # "learned" | "rope"
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" | "swiglu"
    # GELU as torch.nn.GELU(approximate=...): "tanh" (GPT-2's gelu_new) or "none" (exact erf,
    # nanoGPT's nn.GELU()). Exported to Hugging Face as gelu_new / gelu.
    gelu_approximate: str = "tanh"
    bias: bool = True  # bias in Linear and LayerNorm
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # true: every block recomputes its activations in backward (the GPT does it itself);
    # false: none; "auto": a training run checkpoints the fewest leading blocks its memory
    # estimate needs to fit the device (trainer/memory_plan.py). Held as True, False or "auto"
    # (a bool given here, or "true"/"false" as OmegaConf's str field passes it).
    activation_checkpointing: str = "auto"
    # A local Hugging Face model dir (config.json + model.safetensors) to start from. Read by the
    # trainer before the engine is built; the model itself never touches the filesystem.
    init_from: Optional[str] = None

    def __post_init__(self) -> None:
        for field in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            value = getattr(self, field)
            if value <= 0:
                raise ValueError(f"{field} ({value}) must be positive")
        for field in ("n_kv_head", "d_ff"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ValueError(f"{field} ({value}) must be positive or None")
        for field in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, field)
            if not value > 0:
                raise ValueError(f"{field} ({value}) must be positive")
        _one_of("pos_embedding", self.pos_embedding, _POS_EMBEDDINGS)
        _one_of("norm", self.norm, _NORMS)
        _one_of("mlp", self.mlp, _MLPS)
        _one_of("gelu_approximate", self.gelu_approximate, ("tanh", "none"))
        object.__setattr__(
            self,
            "activation_checkpointing",
            tristate("activation_checkpointing", self.activation_checkpointing),
        )
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_head % self.kv_heads != 0:
            raise ValueError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout ({self.dropout}) must satisfy 0 <= dropout < 1")
        if self.pos_embedding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"head_dim ({self.head_dim} = d_model {self.d_model} / n_head {self.n_head}) "
                "must be even for pos_embedding 'rope'"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            hidden = int(8 * self.d_model / 3)
            return 64 * math.ceil(hidden / 64)
        return 4 * self.d_model


def shape_of(cfg: GPTConfig) -> dict:
    """The resolved values that decide the shapes and meaning of a model's weights: the one
    list compared when a checkpoint is resumed or a Hugging Face model is loaded (None defaults
    resolved, so n_kv_head=None equals n_kv_head=n_head). block_size counts only with learned
    positions (it sizes wpe; RoPE tables are computed), rope_theta only with RoPE."""
    fields = {
        "vocab_size": cfg.vocab_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_kv_head": cfg.kv_heads,
        "d_model": cfg.d_model,
        "d_ff": cfg.ffn_dim,
        "pos_embedding": cfg.pos_embedding,
        "norm": cfg.norm,
        "mlp": cfg.mlp,
        "bias": cfg.bias,
        "tie_embeddings": cfg.tie_embeddings,
    }
    if cfg.pos_embedding == "learned":
        fields["block_size"] = cfg.block_size
    else:
        fields["rope_theta"] = cfg.rope_theta
    if cfg.mlp == "gelu":
        fields["gelu_approximate"] = cfg.gelu_approximate
    return fields
