"""The language-model loss without the whole (B, T, V) fp32 logits.

The plain loss, F.cross_entropy(lm_head(x).float(), targets), holds the logits in the model's
dtype, their fp32 copy and the fp32 log-softmax saved for backward: about 10 bytes per token
and vocabulary entry (13 GB at micro batch 8 x 2048 and V 50304). Here the head and the loss
run `chunk` tokens at a time, each chunk but the last under torch's non-reentrant checkpoint:
the forward keeps only their loss sums, the backward recomputes one chunk's logits at a time
(the last chunk's, kept, are the first the backward frees). Peak memory is one chunk's logits;
the price is one more forward matmul of the head for all chunks but the last (none when the
tokens fit one chunk). The head is called as a module (not its weight), so ZeRO-3's hooks
gather its weight in the recompute as they do for a checkpointed block.

Shape legend: N tokens (B * T), C d_model, V vocab_size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


def _head_loss_sum(head: nn.Module, x: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    logits = head(x).float()  # (n, V): one chunk
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")


def _chunked_mean(loss_sum, x: torch.Tensor, targets: torch.Tensor, chunk: int, ignore_index: int):
    """F.cross_entropy's mean from loss_sum(x_chunk, targets_chunk) over `chunk` rows of x (N,
    ...) at a time, every chunk but the last checkpointed: the sum over the targets that count
    divided by their number (0/0 = nan when none does, as there; a tensor division, no host
    sync)."""
    pieces = list(zip(x.split(chunk), targets.split(chunk)))
    sums = [checkpoint(loss_sum, xc, tc, use_reentrant=False) for xc, tc in pieces[:-1]]
    sums.append(loss_sum(*pieces[-1]))
    return torch.stack(sums).sum() / (targets != ignore_index).sum()


def chunked_head_cross_entropy(
    head: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    ignore_index: int = -1,
) -> torch.Tensor:
    """mean cross-entropy of head(x) against targets, equal to
    F.cross_entropy(head(x).float().view(-1, V), targets.view(-1), ignore_index=ignore_index)
    up to fp32 summation order, without ever holding more than `chunk` tokens' logits.
    x: (..., C), targets: (...) of the same leading shape."""
    x = x.reshape(-1, x.size(-1))  # (N, C)
    targets = targets.reshape(-1)  # (N,)

    def loss_sum(xc, tc):
        return _head_loss_sum(head, xc, tc, ignore_index)

    return _chunked_mean(loss_sum, x, targets, chunk, ignore_index)


def chunked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, chunk: int, ignore_index: int = -1
) -> torch.Tensor:
    """F.cross_entropy(logits.float().view(-1, V), targets.view(-1)) over given logits (a
    pipeline's last stage hands them over), `chunk` tokens at a time: the fp32 copy and its
    log-softmax exist for one chunk only, the backward recomputes them per chunk."""
    logits = logits.reshape(-1, logits.size(-1))  # (N, V)
    targets = targets.reshape(-1)  # (N,)

    def loss_sum(lc, tc):
        return _loss_sum(lc, tc, ignore_index)

    return _chunked_mean(loss_sum, logits, targets, chunk, ignore_index)
