"""Parallelism applied from outside the model, by small functions.

- `make_layout`, `Layout`, `check_model_fits`: the layout arithmetic, in trainer/layout.py.
- `tensor_parallel_config`: DeepSpeed AutoTP partition specs matched by our module names.
- `pipeline_module`: a DeepSpeed PipelineModule built from the GPT's own modules (embedding,
  blocks, final norm + head), with the embedding and head tied across the first and last stage.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from models.gpt import GPT
from trainer.layout import Layout, check_model_fits, make_layout  # noqa: F401

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
