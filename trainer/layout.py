"""The parallel layout as arithmetic: world = data x tensor x pipeline, and the shape rules
each model-parallel dimension puts on the model. Torch-free, so trainer/config.py validates
with it and trainer/worker/parallel.py applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.config import GPTConfig


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
    """The one place that splits the world into data x tensor x pipeline factors."""
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
