"""CPU kernels applied to the model from outside it (trainer.contiguous_weight_grad).

oneDNN's bf16 matmul (AMX, the kernel torch uses for bf16 on CPU) runs at about half its rate
when its left operand is transposed in memory. nn.Linear's weight gradient is exactly that case:
grad_W = grad_out.T @ input, both (tokens, features) row-major, so the contraction runs over
their leading dimension (bench/README.md: 876 vs 1,611 GFLOP/s for the same 8192x2048x2048
product). ContiguousGradLinear computes the same products from a contiguous transposed copy of
the operand that is cheaper to copy.

Only layers with at least MIN_FEATURES inputs and outputs are swapped: in a per-shape probe
(2,048 tokens, bench/README.md) the copy cost more than it saved below 768 features and won
1.18x at 1024x1024, 1.3-1.8x from 2048 up; gpt-tiny has no such layer. The swap changes the class of each such nn.Linear in place: parameter names, state_dict keys,
checkpoints and tied weights stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

MIN_FEATURES = 1024
_ROWS_PER_COPY = 64  # a transpose in row blocks runs ~1.5x faster than one strided copy


def transposed(x: torch.Tensor) -> torch.Tensor:
    """x.T as a contiguous tensor, x (M, N) -> (N, M)."""
    M, N = x.shape
    out = x.new_empty(N, M)
    for i in range(0, M, _ROWS_PER_COPY):
        out[:, i : i + _ROWS_PER_COPY].copy_(x[i : i + _ROWS_PER_COPY].T)
    return out


def weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g.T @ x for g (N, out), x (N, in) -> (out, in), no transposed left operand.

    Either g.T is copied (N x out elements), or x.T is copied and the (in, out) product is
    transposed back (N x in + in x out elements): whichever copies less."""
    n, out_f = g.shape
    in_f = x.shape[1]
    if n * out_f <= n * in_f + in_f * out_f:
        return transposed(g) @ x  # (out, N) @ (N, in)
    return transposed(transposed(x) @ g)  # ((in, N) @ (N, out)).T


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).view(x.shape)  # (N, out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(g, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


class ContiguousGradLinear(nn.Linear):
    """nn.Linear whose weight gradient never takes a transposed left operand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFunction.apply(x, self.weight, self.bias)


def use_contiguous_weight_grad(model: nn.Module) -> int:
    """Each plain nn.Linear of `model` with >= MIN_FEATURES inputs and outputs becomes a
    ContiguousGradLinear; returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear and min(module.weight.shape) >= MIN_FEATURES:
            module.__class__ = ContiguousGradLinear
            swapped += 1
    return swapped
