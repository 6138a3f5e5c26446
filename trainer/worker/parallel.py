"""Parallelism applied from outside the model, by small functions.

- `make_layout`, `Layout`, `check_model_fits`: the layout arithmetic, in trainer/layout.py.
- `apply_zero`, `apply_tp`, `apply_ac`: each returns its DeepSpeed config fragment, which
  trainer/worker/engine.py deepspeed_config merges into the one config of a run.
- `apply_pp`, `apply_ac_blocks`, `apply_sp`, `apply_compile`: each returns the transformed
  module, which build_engine hands to deepspeed.initialize. `plan_ac` decides the blocks of
  activation_checkpointing "auto" (trainer/memory_plan.py). apply_sp sets the GPT's
  sequence-parallel hooks (Ulysses all-to-all around attention, `SequenceParallel`).
- `tensor_parallel_config`: DeepSpeed AutoTP partition specs matched by our module names (the
  export splits and joins tensor-parallel shards by the same specs).
- `pipeline_layers`: the GPT's own modules (embedding, blocks, final norm + head) as pipeline
  layers, with the embedding and head tied across the first and last stage.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.gpt import GPT, GPTConfig
from models.loss import chunked_cross_entropy
from trainer.config import ParallelConfig, PrecisionConfig
from trainer.layout import Layout, check_model_fits, make_layout  # noqa: F401
from trainer.memory_plan import checkpointed_blocks, describe, estimate_memory

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


# ----------------------------------------------------- tensor parallel inside pipeline stages
# DeepSpeed's AutoTP does not build inside its pipeline engine, so 3-D layouts (TP x PP) split
# the blocks' Linear layers here, Megatron-style, by the same specs (column: q/k/v/up/gate by
# output; row: o_proj/down by input). The modules keep their names and class family (nn.Linear
# subclasses), so parameter names stay those of a whole model.


class _CopyToTensorParallel(torch.autograd.Function):
    """Forward: the input as is (every TP rank holds it whole). Backward: the gradients of the
    ranks' column shards summed."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Forward: the ranks' partial products of a row shard summed. Backward: as is."""

    @staticmethod
    def forward(ctx, y, group):
        y = y.clone()
        torch.distributed.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ColumnParallelLinear(nn.Linear):
    """An nn.Linear holding one rank's slice of the output features (weight rows and bias)."""

    tp_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToTensorParallel.apply(x, self.tp_group), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """An nn.Linear holding one rank's slice of the input features; the bias (whole, the same
    on every rank) is added once, after the sum."""

    tp_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ReduceFromTensorParallel.apply(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


COLUMN = ("q_proj", "k_proj", "v_proj", "up", "gate")
ROW = ("o_proj", "down")


def _shard_linear(linear: nn.Linear, cls: type, group, rank: int, tp: int) -> None:
    dim = 0 if cls is ColumnParallelLinear else 1
    linear.__class__ = cls
    linear.tp_group = group
    linear.weight = nn.Parameter(linear.weight.data.chunk(tp, dim)[rank].clone())
    linear.weight.tensor_model_parallel = True  # DeepSpeed's grad norm sums shards over ranks
    if linear.bias is not None and dim == 0:
        linear.bias = nn.Parameter(linear.bias.data.chunk(tp)[rank].clone())
        linear.bias.tensor_model_parallel = True


def tensor_parallel_groups(layout: Layout) -> list[list[int]]:
    """The ranks of each tensor-parallel group: consecutive ranks (DeepSpeed's
    PipeModelDataParallelTopology puts the model axis last)."""
    return [list(range(i, i + layout.tp)) for i in range(0, layout.world, layout.tp)]


def apply_tp_blocks(gpt: GPT, layout: Layout, rank: int) -> GPT:
    """Tensor parallelism of a pipeline's blocks, in place (3-D layouts; every rank calls it:
    the groups are created collectively). Every rank built the same whole `gpt` (same seed), so
    each keeps exactly its slice of the single-process weights. Embedding, norms and head stay
    whole on every rank."""
    if layout.tp == 1 or layout.pp == 1:
        return gpt
    mine = None
    for ranks in tensor_parallel_groups(layout):
        group = torch.distributed.new_group(ranks)
        if rank in ranks:
            mine = group
    tp_rank = layout.tp_rank(rank)
    for block in gpt.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    cls = ColumnParallelLinear if name in COLUMN else RowParallelLinear
                    _shard_linear(child, cls, mine, tp_rank, layout.tp)
    return gpt


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


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """The pipeline's loss of the last stage's logits; chunk > 0: `chunk` tokens at a time
    (models/loss.py), so no fp32 copy of the whole logits exists."""
    if chunk:
        return chunked_cross_entropy(logits, targets, chunk)
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


# ------------------------------------------------------------------------ sequence parallel
# Ulysses (DeepSpeed-Ulysses' scheme, written here in torch.distributed): each of the N ranks of
# a sequence group holds a T/N slice of every sample. Around attention one all-to-all trades
# that for H/N whole heads over the whole sequence (so causal masking and RoPE see the full
# sequence, positions 0..T-1), and the inverse all-to-all trades back. Everything else in a
# block is per token and runs on the slice.


def _heads_to_sequence(x: torch.Tensor, group, n: int) -> torch.Tensor:
    """(B, T/N, H, D) on each rank -> (B, T, H/N, D): rank r keeps heads r*H/N.. of every slice."""
    B, t, H, D = x.shape
    send = x.reshape(B, t, n, H // n, D).permute(2, 0, 1, 3, 4).contiguous()  # (N, B, t, H/N, D)
    recv = torch.empty_like(send)
    torch.distributed.all_to_all_single(recv, send, group=group)  # recv[j]: slice j, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(B, n * t, H // n, D)


def _sequence_to_heads(y: torch.Tensor, group, n: int) -> torch.Tensor:
    """(B, T, H/N, D) -> (B, T/N, H, D): the inverse of _heads_to_sequence."""
    B, T, h, D = y.shape
    send = y.reshape(B, n, T // n, h, D).permute(1, 0, 2, 3, 4).contiguous()  # (N, B, t, h, D)
    recv = torch.empty_like(send)
    torch.distributed.all_to_all_single(recv, send, group=group)  # recv[i]: rank i's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(B, T // n, n * h, D)


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, n):
        ctx.group, ctx.n = group, n
        return _heads_to_sequence(x, group, n)

    @staticmethod
    def backward(ctx, grad):
        return _sequence_to_heads(grad, ctx.group, ctx.n), None, None


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, n):
        ctx.group, ctx.n = group, n
        return _sequence_to_heads(y, group, n)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_sequence(grad, ctx.group, ctx.n), None, None


class SequenceParallel:
    """The hook models/gpt.py's GPT and attention modules call when set: this rank is slice
    `rank` of `size` in its sequence group `group` (a torch.distributed process group)."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return _HeadsToSequence.apply(x, self.group, self.size)

    def sequence_to_heads(self, y: torch.Tensor) -> torch.Tensor:
        return _SequenceToHeads.apply(y, self.group, self.size)


def sequence_groups(layout: Layout) -> list[list[int]]:
    """The ranks of each sequence group (same data and tensor rank, every sequence slice)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for rank in range(layout.world):
        groups.setdefault((layout.dp_rank(rank), layout.tp_rank(rank)), []).append(rank)
    return list(groups.values())


def apply_sp(gpt: GPT, layout: Layout, rank: int) -> GPT:
    """Sequence parallelism on `gpt`, in place: its hooks set to this rank's sequence group
    (every rank must call it: the groups are created collectively). Gradients need no group of
    their own: DeepSpeed averages them over all layout.deepspeed_dp ranks, and since each rank's
    loss is the mean over its T/N tokens, that average is exactly the gradient of the mean loss
    over whole sequences (the all-to-alls' backward carries each slice's share to the others)."""
    if layout.sp == 1:
        return gpt
    mine = None
    for ranks in sequence_groups(layout):
        group = torch.distributed.new_group(ranks)
        if rank in ranks:
            mine = SequenceParallel(group, layout.sp_rank(rank), layout.sp)
    gpt.sequence_parallel = mine
    for block in gpt.blocks:
        block.attn.sequence_parallel = mine
    return gpt


@contextlib.contextmanager
def sequence_parallel_off(gpt: GPT):
    """Inside: `gpt` runs whole sequences on this rank alone (generation after training)."""
    hook = gpt.sequence_parallel
    modules = [gpt, *(block.attn for block in gpt.blocks)]
    for m in modules:
        m.sequence_parallel = None
    try:
        yield gpt
    finally:
        for m in modules:
            m.sequence_parallel = hook


# ------------------------------------------------------------------ the apply_* functions
# Each takes the sub-config it needs and returns its piece. A fragment's None value removes the
# key from the config (engine.py merge_config).


def apply_zero(parallel: ParallelConfig, *, device_type: str = "cpu") -> dict[str, Any]:
    """ZeRO's fragment: the stage, its buckets and offload. device_type: the accelerator's
    ("cuda" | "cpu"): it decides the "auto" settings (trainer/config.py ZERO_BY_DEVICE), and
    offloaded state is pinned for copies to a GPU only."""
    parallel = parallel.on(device_type)
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    if parallel.zero_stage > 0:
        zero.update(
            overlap_comm=parallel.overlap_comm,
            contiguous_gradients=True,
            reduce_bucket_size=parallel.reduce_bucket_size,
            allgather_bucket_size=parallel.allgather_bucket_size,
        )
    if parallel.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=parallel.prefetch_bucket_size,
            stage3_param_persistence_threshold=parallel.param_persistence_threshold,
            stage3_gather_16bit_weights_on_model_save=False,
            sub_group_size=parallel.sub_group_size,
        )
    offload: dict[str, Any] = {
        "device": parallel.offload_device,
        "pin_memory": device_type == "cuda",
    }
    if parallel.offload_device == "nvme":
        offload["nvme_path"] = parallel.nvme_path
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = dict(offload)
    if parallel.offload_params:
        zero["offload_param"] = dict(offload)
    return {"zero_optimization": zero}


def apply_tp(layout: Layout) -> dict[str, Any]:
    """Tensor parallelism's fragment: deepspeed.initialize splits the model's Linear layers by
    name (DeepSpeed AutoTP, tensor_parallel_config). Without an mpu DeepSpeed checks the batch
    against the whole world before it builds the tensor-parallel groups, so the fragment drops
    train_batch_size: DeepSpeed derives the global batch from micro x accumulation."""
    if layout.tp == 1 or layout.pp > 1:  # 3-D: apply_tp_blocks splits the blocks instead
        return {}
    return {"tensor_parallel": tensor_parallel_config(layout.tp), "train_batch_size": None}


def apply_ac(
    model: GPTConfig, parallel: ParallelConfig, layout: Layout, auto_blocks: int = 0
) -> dict[str, Any]:
    """Activation checkpointing's fragment. A pipeline checkpoints every
    parallel.pipeline_checkpoint_interval layers (0: every layer if model.activation_checkpointing
    is true, or is "auto" and plan_ac chose auto_blocks > 0): DeepSpeed's
    pipeline.activation_checkpoint_interval, which its pipeline engine sets on the
    PipelineModule (apply_pp builds it with torch's non-reentrant checkpoint). Without a pipeline
    the GPT checkpoints each block in its own forward when model.activation_checkpointing is
    true (models/gpt.py), and apply_ac_blocks checkpoints the first auto_blocks ("auto"): both
    around the block's module call, so ZeRO-3's hooks gather the parameters again for the
    recompute and parameter names stay those of the checkpoints."""
    if layout.pp == 1:
        return {}
    on = model.activation_checkpointing is True or auto_blocks > 0
    interval = parallel.pipeline_checkpoint_interval or int(on)
    return {"pipeline": {"activation_checkpoint_interval": interval}} if interval else {}


def plan_ac(
    model: GPTConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    layout: Layout,
    *,
    micro_batch: int,
    seq_len: int,
    loss_chunk: int,
    device_type: str,
) -> tuple[int, str | None]:
    """(blocks to checkpoint from outside the model, the line to print once) for
    model.activation_checkpointing "auto": trainer/memory_plan.py's choice for this device's
    memory (device_memory). (0, None) for true and false, which the GPT applies itself."""
    if model.activation_checkpointing != "auto":
        return 0, None
    from models.gpt import estimate_num_params

    estimate = estimate_memory(
        model,
        parallel,
        precision,
        layout,
        num_params=estimate_num_params(model),
        micro_batch=micro_batch,
        seq_len=seq_len,
        loss_chunk=loss_chunk,
    )
    memory = device_memory(device_type)
    blocks = checkpointed_blocks(estimate, memory)
    return blocks, describe(estimate, blocks, memory, device_type)


def device_memory(device_type: str) -> int:
    """The memory one worker may fill, in bytes: the GPU's total memory on CUDA; on the CPU the
    host's RAM divided among the node's workers (LOCAL_WORLD_SIZE)."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def apply_ac_blocks(gpt: GPT, blocks: int) -> GPT:
    """Activation checkpointing of gpt's first `blocks` blocks, in place and from outside the
    model: torch's composable checkpoint (non-reentrant) puts it in the block's forward hooks,
    so module structure and parameter names stay as they are (checkpoints) and the recompute
    calls the block as a module again (ZeRO-3's hooks gather its parameters)."""
    from torch.distributed._composable import checkpoint

    for block in gpt.blocks[:blocks]:
        checkpoint(block)
    return gpt


def apply_pp(gpt: GPT, layout: Layout, parallel: ParallelConfig) -> nn.Module:
    """The GPT as layout.pp pipeline stages (a DeepSpeed PipelineModule; `gpt` itself with one
    stage). Every rank built the same `gpt` (same seed), so each stage starts from exactly the
    weights a single process would have. The loss is chunked as the GPT's (gpt.loss_chunk). With
    tensor parallelism (3-D) the stages' blocks are apply_tp_blocks' and the topology's model
    axis is the tensor-parallel one."""
    if layout.pp == 1:
        return gpt
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    # Only 3-D names a model axis: with it DeepSpeed writes layer_<i>-model_<m>-model_states.pt,
    # so a plain pipeline keeps the topology (and the layer files) it always had.
    topology = (
        PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
        if layout.tp > 1
        else None
    )
    return PipelineModule(
        layers=pipeline_layers(gpt),
        num_stages=None if topology else layout.pp,
        topology=topology,
        loss_fn=functools.partial(lm_loss, chunk=gpt.loss_chunk),
        partition_method=parallel.pipeline_partition,
        activation_checkpoint_func=functools.partial(
            torch.utils.checkpoint.checkpoint, use_reentrant=False
        ),
        checkpointable_layers=["Block"],
    )


def apply_compile(model: nn.Module, enabled: bool, eager_first: int = 0) -> nn.Module:
    """torch.compile (inductor) of each transformer block, in place (Module.compile), when
    enabled: parameter names, state_dict keys and so checkpoints stay as they are, and
    DeepSpeed's hooks around the blocks stay eager. The first eager_first blocks stay eager:
    those apply_ac_blocks checkpointed (its hooks inside a compiled module call are not
    proven yet)."""
    if enabled:
        for block in model.blocks[eager_first:]:
            block.compile()
    return model


def compile_on(setting: bool | str, device_type: str, layout: Layout, parallel: ParallelConfig):
    """trainer.compile resolved: "auto" compiles on CUDA with data parallelism at ZeRO 0-2
    (TP, PP and ZeRO-3 put hooks inside the blocks; trainer/config.py refuses true there)."""
    if setting != "auto":
        return bool(setting)
    dp_only = layout.tp == 1 and layout.pp == 1 and parallel.zero_stage < 3
    return device_type == "cuda" and dp_only
