"""The parallel layout as arithmetic: world = data x tensor x pipeline x sequence, and the shape
rules each model-parallel dimension puts on the model. Torch-free, so trainer/config.py
validates with it and trainer/worker/parallel.py applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.config import GPTConfig


@dataclass(frozen=True)
class Layout:
    """world = dp x tp x pp x sp. Rank order (DeepSpeed's): tensor-parallel peers are consecutive
    ranks; pipeline ranks are stage-major (rank = stage * dp * tp + dp_rank * tp + tp_rank, as
    DeepSpeed's PipeModelDataParallelTopology orders its axes pipe, data, model); without a
    pipeline, sequence-parallel peers come next (rank = (dp_rank * sp + sp_rank) * tp + tp_rank).
    DeepSpeed sees the sequence-parallel ranks as data-parallel ones (deepspeed_dp)."""

    world: int
    dp: int
    tp: int
    pp: int
    sp: int = 1

    def __str__(self) -> str:
        s = f"world {self.world} = data {self.dp} x tensor {self.tp} x pipeline {self.pp}"
        return s + (f" x sequence {self.sp}" if self.sp > 1 else "")

    @property
    def deepspeed_dp(self) -> int:
        """The data-parallel size DeepSpeed reduces gradients over and shards ZeRO state across:
        every data and sequence rank of one model-parallel slot."""
        return self.dp * self.sp

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank that selects this rank's data shard (TP/PP/SP peers share it)."""
        if self.pp > 1:
            return (rank // self.tp) % self.dp
        return rank // (self.tp * self.sp)

    def sp_rank(self, rank: int) -> int:
        """Which slice of the sequence this rank holds (0 without sequence parallelism)."""
        return (rank // self.tp) % self.sp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def stage(self, rank: int) -> int:
        return rank // (self.dp * self.tp) if self.pp > 1 else 0


def make_layout(world: int, tp: int, pp: int, sp: int = 1) -> Layout:
    """The one place that splits the world into data x tensor x pipeline x sequence factors."""
    if tp < 1 or pp < 1 or sp < 1:
        raise ValueError(
            f"tensor_parallel ({tp}), pipeline_parallel ({pp}) and sequence_parallel ({sp}) "
            "must be >= 1"
        )
    if world % (tp * pp * sp):
        raise ValueError(
            f"cluster.num_workers ({world}) is not divisible by tensor_parallel ({tp}) x "
            f"pipeline_parallel ({pp}) x sequence_parallel ({sp}) = {tp * pp * sp}: "
            f"data-parallel size would be {world / (tp * pp * sp):g}"
        )
    return Layout(world=world, dp=world // (tp * pp * sp), tp=tp, pp=pp, sp=sp)


def check_model_fits(model: GPTConfig, layout: Layout) -> None:
    """Shape rules of each model-parallel dimension; ValueError names the values."""
    tp, sp = layout.tp, layout.sp
    for name, value in (
        ("n_head", model.n_head),
        ("n_kv_head", model.kv_heads),
        ("FFN width (d_ff)", model.ffn_dim),
    ):
        if value % tp:
            raise ValueError(f"model {name} ({value}) is not divisible by tensor_parallel ({tp})")
    for name, value in (("n_head", model.n_head), ("n_kv_head", model.kv_heads)):
        if value % (tp * sp):
            raise ValueError(
                f"model {name} ({value}) is not divisible by sequence_parallel ({sp})"
                + (f" x tensor_parallel ({tp})" if tp > 1 else "")
                + ": Ulysses gives each sequence rank whole heads"
            )
    if model.n_layer < layout.pp:
        raise ValueError(
            f"model.n_layer ({model.n_layer}) is smaller than pipeline_parallel ({layout.pp}): "
            "every stage needs at least one block"
        )


def check_sequence_fits(seq_len: int, layout: Layout) -> None:
    """Sequence parallelism cuts every sample into sp equal slices."""
    if seq_len % layout.sp:
        raise ValueError(
            f"data.seq_len ({seq_len}) is not divisible by sequence_parallel ({layout.sp}): "
            "every sequence rank holds an equal slice"
        )
