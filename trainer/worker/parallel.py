"""Parallelism applied from outside the model, by small functions.

- `make_layout`: the one place that splits the world into data x tensor x pipeline factors.
- `tensor_parallel_config`: DeepSpeed AutoTP partition specs matched by our module names.
- `pipeline_module`: a DeepSpeed PipelineModule built from the GPT's own modules (embedding,
  blocks, final norm + head), with the embedding and head tied across the first and last stage.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.gpt import GPT, GPTConfig


@dataclass(frozen=True)
class Layout:
    """world = dp x tp x pp. Rank order (DeepSpeed's): tensor-parallel peers are consecutive
    ranks; pipeline ranks are stage-major (rank = stage * dp + dp_rank)."""

    world: int
    dp: int
    tp: int
    pp: int

    def __str__(self) -> str:
        return f"world {self.world} = data {self.dp} x tensor {self.tp} x pipeline {self.pp}"

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank that selects this rank's data shard (TP/PP peers share it)."""
        if self.pp > 1:
            return rank % self.dp
        return rank // self.tp


def make_layout(world: int, tp: int, pp: int) -> Layout:
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_parallel ({tp}) and pipeline_parallel ({pp}) must be >= 1")
    if world % (tp * pp):
        raise ValueError(
            f"cluster.num_workers ({world}) is not divisible by tensor_parallel ({tp}) x "
            f"pipeline_parallel ({pp}) = {tp * pp}: data-parallel size would be "
            f"{world / (tp * pp):g}"
        )
    return Layout(world=world, dp=world // (tp * pp), tp=tp, pp=pp)


def check_model_fits(model: GPTConfig, layout: Layout) -> None:
    """Shape rules of each model-parallel dimension; ValueError names the values."""
    tp = layout.tp
    for name, value in (
        ("n_head", model.n_head),
        ("n_kv_head", model.kv_heads),
        ("FFN width (d_ff)", model.ffn_dim),
    ):
        if value % tp:
            raise ValueError(f"model {name} ({value}) is not divisible by tensor_parallel ({tp})")
    if model.n_layer < layout.pp:
        raise ValueError(
            f"model.n_layer ({model.n_layer}) is smaller than pipeline_parallel ({layout.pp}): "
            "every stage needs at least one block"
        )


# --------------------------------------------------------------------------- tensor parallel


def tensor_parallel_config(tp: int) -> dict:
    """AutoTP specs: q/k/v, up and gate projections split by output (column), attention output
    and down projection by input (row). Separate q/k/v modules keep every head whole on one
    rank; embeddings, norms and the (tied) head stay replicated."""
    return {
        "autotp_size": tp,
        "partition_config": {
            "use_default_specs": False,
            "layer_specs": [
                {
                    "patterns": [r".*\.(q_proj|k_proj|v_proj|up|gate)\.weight$"],
                    "partition_type": "column",
                },
                {"patterns": [r".*\.(o_proj|down)\.weight$"], "partition_type": "row"},
            ],
        },
    }


# ------------------------------------------------------------------------- pipeline parallel


class EmbeddingStage(nn.Module):
    """Token (+ learned position) embedding; the module the tied head reuses."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.wte = gpt.wte
        self.wpe = getattr(gpt, "wpe", None)
        self.drop = gpt.drop

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.size(1), device=idx.device))
        return self.drop(x)


class FinalNormStage(nn.Module):
    def __init__(self, gpt: GPT):
        super().__init__()
        self.ln_f = gpt.ln_f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)


class HeadStage(nn.Module):
    """Untied output head."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.lm_head = gpt.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


def _tied_head(stage: EmbeddingStage, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, stage.wte.weight)  # (B, T, vocab)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


def pipeline_layers(gpt: GPT) -> list:
    """The GPT as DeepSpeed pipeline layers, in order: embedding, blocks, final norm, head (with
    tied embeddings the head is the embedding module again, under the key "embed"). The export
    (trainer/export.py) reads the layer order of pipeline checkpoints from this list."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    cfg = gpt.config
    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", EmbeddingStage, gpt, tied_weight_attr=["wte.weight"])
        last = [
            LayerSpec(FinalNormStage, gpt),
            TiedLayerSpec(
                "embed", EmbeddingStage, gpt, forward_fn=_tied_head, tied_weight_attr=["wte.weight"]
            ),
        ]
    else:
        first = LayerSpec(EmbeddingStage, gpt)
        last = [LayerSpec(FinalNormStage, gpt), LayerSpec(HeadStage, gpt)]
    return [first, *gpt.blocks, *last]


def pipeline_module(gpt: GPT, layout: Layout, *, partition_method: str, checkpoint_interval: int):
    """The GPT as pipeline stages. Every rank built the same `gpt` (same seed), so each stage
    starts from exactly the weights a single process would have."""
    from deepspeed.pipe import PipelineModule

    return PipelineModule(
        layers=pipeline_layers(gpt),
        num_stages=layout.pp,
        loss_fn=lm_loss,
        partition_method=partition_method,
        activation_checkpoint_interval=checkpoint_interval,
        activation_checkpoint_func=functools.partial(
            torch.utils.checkpoint.checkpoint, use_reentrant=False
        ),
        checkpointable_layers=["Block"],
    )
