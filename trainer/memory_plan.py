"""`model.activation_checkpointing: auto`: how many blocks to checkpoint, from an estimate of a
rank's memory and the device's. Torch-free and pure: the worker passes the device's bytes
(CUDA: the GPU's total memory; CPU: the host's RAM shared by the node's workers) and prints
the choice once (trainer/worker/parallel.py applies it to the first blocks).

The estimate, per rank, in bytes (w: 2 for bf16/fp16, 4 for fp32; P: parameters):
- states: weights w and gradients w per parameter; mixed precision adds the fp32 master copy
  (4), DeepSpeed's fp32 gradient accumulation (4) and Adam's two moments (8): 16 + 2w = 20
  bytes per parameter in bf16; fp32 has no copy and accumulates in its gradients: 16.
  ZeRO-1 divides the master copy and moments by the data-parallel size, ZeRO-2 the
  gradients too, ZeRO-3 the weights too; offloaded state is not on the device. Tensor and
  pipeline parallelism divide everything by their size.
- a block's activations kept for backward, per token, in elements of w bytes: its two norms'
  inputs and outputs (4 d), q, k, v (d + 2 kv) and the attention output (d) that attention's
  backward reads, the MLP's hidden activations (GELU: its input and output, 2 F; SwiGLU: gate,
  its SiLU, up and their product, 4 F). A checkpointed block keeps only its input (d) and
  recomputes the rest, one block at a time, during backward (one block's worth more).
- other: the loss's logits of one chunk (models/loss.py: the logits in w, their fp32 copy and
  the fp32 log-softmax, (w + 8) bytes per token and vocabulary entry; the whole micro batch
  without chunks) and the embedding output, final norm input and output (3 d per token).
Attention runs in SDPA's fused kernels, so no (T x T) scores are kept. The estimate ignores
DeepSpeed's communication buckets, the CUDA context and allocator fragmentation: the budget
is HEADROOM of the device's memory to leave room for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.config import GPTConfig
    from trainer.config import ParallelConfig, PrecisionConfig
    from trainer.layout import Layout

HEADROOM = 0.85  # the budget: this fraction of the device's memory
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's training memory in bytes, as a function of the checkpointed blocks."""

    states: int  # weights, gradients, master copy and optimizer moments
    other: int  # one loss chunk's logits, embedding and final-norm activations
    block: int  # what one block keeps for backward
    block_checkpointed: int  # what one checkpointed block keeps (its input)
    blocks: int  # blocks on this rank

    def total(self, checkpointed: int) -> int:
        recompute = self.block if checkpointed else 0
        kept = (self.blocks - checkpointed) * self.block + checkpointed * self.block_checkpointed
        return self.states + self.other + kept + recompute


def estimate_memory(
    model: GPTConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    layout: Layout,
    *,
    num_params: int,
    micro_batch: int,
    seq_len: int,
    loss_chunk: int,
) -> MemoryEstimate:
    """The estimate of the module docstring for one rank of `layout`. num_params: the model's
    (models/gpt.py estimate_num_params)."""
    w = 4 if precision.dtype_name == "fp32" else 2
    mixed = w != 4
    stage, dp = parallel.zero_stage, layout.dp
    weights = w
    grads = w + (4 if mixed else 0)
    optimizer = (4 if mixed else 0) + 8
    if parallel.offload_optimizer:
        optimizer = 0
    if stage >= 1:
        optimizer /= dp
    if stage >= 2:
        grads /= dp
    if stage == 3:
        weights = 0 if parallel.offload_params else weights / dp
    model_parallel = layout.tp * layout.pp
    states = num_params * (weights + grads + optimizer) / model_parallel

    d, kv = model.d_model, model.kv_heads * model.head_dim
    hidden = (4 if model.mlp == "swiglu" else 2) * model.ffn_dim
    tokens = micro_batch * seq_len
    block = (6 * d + 2 * kv + hidden) * w * tokens // layout.tp
    logit_tokens = min(tokens, loss_chunk) if loss_chunk else tokens
    other = logit_tokens * model.vocab_size * (w + 8) + 3 * d * w * tokens
    return MemoryEstimate(
        states=int(states),
        other=int(other),
        block=int(block),
        block_checkpointed=d * w * tokens,
        blocks=-(-model.n_layer // layout.pp),
    )


def checkpointed_blocks(estimate: MemoryEstimate, device_bytes: int) -> int:
    """The fewest leading blocks to checkpoint so the estimate fits HEADROOM x device_bytes:
    0 when everything fits, all blocks when even that does not fit."""
    budget = HEADROOM * device_bytes
    for k in range(estimate.blocks + 1):
        if estimate.total(k) <= budget:
            return k
    return estimate.blocks


def describe(estimate: MemoryEstimate, checkpointed: int, device_bytes: int, device: str) -> str:
    """The one line the worker prints about the choice."""
    total, budget = estimate.total(checkpointed), HEADROOM * device_bytes
    line = (
        f"activation checkpointing auto: {checkpointed} of {estimate.blocks} blocks "
        f"(estimate {total / GIB:.1f} GiB of a {budget / GIB:.1f} GiB budget = "
        f"{HEADROOM:g} x {device_bytes / GIB:.1f} GiB {device})"
    )
    if total > budget:
        line += (
            "; it does not fit even so: lower trainer.micro_batch_size, or shard more "
            "(parallel=zero3, offload)"
        )
    return line
