"""The layout a checkpoint was written under, and where DeepSpeed put each rank's shards.

One description for everything that reads a checkpoint of some layout: compat.py reports
which LAYOUT_FIELDS changed on resume, universal.py decides from two ShardLayouts whether the
checkpoint must be converted, trainer/export.py consolidates the shards of any layout.

What DeepSpeed 0.19 writes into ckpt/ds/ds/ (d: data-parallel rank; m: model-parallel rank,
which is the tensor-parallel rank under AutoTP and the stage under pipeline parallelism; the
optimizer files have a "bf16_" prefix when bf16 is on):
  ZeRO-0    mp_rank_<m>_model_states.pt: "module" holds rank m's weights (an AutoTP shard or
            the whole model). No optimizer files.
  ZeRO-1/2  the same model states, whose "param_shapes" list rank m's parameters (name and
            shape, per optimizer group), plus zero_pp_rank_<d>_mp_rank_<m>_optim_states.pt:
            data rank d's slice of the flat fp32 master weights of each group, and in
            "param_slice_mappings" where each parameter's piece sits in that slice.
  ZeRO-3    zero_pp_rank_<d>_mp_rank_00_{model,optim}_states.pt (data parallel only).
  pipeline  also layer_<i>-model_states.pt: the module state of pipeline layer i under local
            names, written by data rank 0 of its stage. mp_rank_<m> then has no "module", and
            its parameter names are "<i>.<local name>" or "tied_modules.<key>.<local name>".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from trainer.layout import make_layout

# The config fields (group, key) that lay a run's state out over its ranks. Any of them may
# change on resume: reported on one line (compat.py), converted where the shards must change
# (universal.py).
LAYOUT_FIELDS = (
    ("cluster", "num_workers"),
    ("parallel", "zero_stage"),
    ("parallel", "tensor_parallel"),
    ("parallel", "pipeline_parallel"),
    ("parallel", "sequence_parallel"),
    ("parallel", "offload_optimizer"),
    ("parallel", "offload_params"),
    ("precision", "name"),
)


@dataclass(frozen=True)
class ShardLayout:
    """How a run's model and optimizer state is split into shards: data x tensor x pipeline
    ranks, ZeRO stage, offload and precision, as LAYOUT_FIELDS of its config give them.
    Sequence-parallel ranks hold data-parallel shards (DeepSpeed sees them as such): dp counts
    them, so SP 2 -> 1 is a data-parallel change."""

    dp: Optional[int]  # None: the config does not say how many workers wrote it
    tp: int = 1
    pp: int = 1
    sp: int = 1  # of the dp ranks, how many hold slices of one sequence (no shard of their own)
    zero: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Optional[str] = None

    @classmethod
    def of(cls, config: dict[str, Any]) -> ShardLayout:
        """The layout of a RootConfig.to_dict()-shaped config (a checkpoint's, or this run's).
        ValueError (one line) when its workers do not split into tensor x pipeline."""
        parallel, cluster = config.get("parallel", {}), config.get("cluster", {})
        tp, pp = int(parallel.get("tensor_parallel", 1)), int(parallel.get("pipeline_parallel", 1))
        world = cluster.get("num_workers")
        return cls(
            dp=None if world is None else make_layout(int(world), tp, pp).dp,
            tp=tp,
            pp=pp,
            sp=int(parallel.get("sequence_parallel", 1)),
            zero=int(parallel.get("zero_stage", 0)),
            offload_optimizer=bool(parallel.get("offload_optimizer", False)),
            offload_params=bool(parallel.get("offload_params", False)),
            precision=config.get("precision", {}).get("name"),
        )

    @property
    def model_parallel(self) -> int:
        """How many model-parallel ranks (mp_rank_<m> files) hold distinct weights."""
        return self.tp * self.pp


def model_states_file(mp_rank: int) -> str:
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def optim_states_file(dp_rank: int, mp_rank: int) -> str:
    """Without the "bf16_" prefix that bf16 runs' files have."""
    return f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def zero3_model_states_file(dp_rank: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_00_model_states.pt"


def layer_file(index: int) -> str:
    return f"layer_{index:02d}-model_states.pt"


def is_optim_states(name: str) -> bool:
    """A ZeRO optimizer shard (ZeRO 1-3 write them; ZeRO-0 keeps its optimizer in mp_rank_00)."""
    return name.endswith("optim_states.pt")
