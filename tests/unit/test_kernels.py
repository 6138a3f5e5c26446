"""trainer/worker/kernels.py: the Linear whose weight gradient avoids a transposed left operand gives
nn.Linear's gradients, and the swap leaves the model's names, small layers and ties alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models.gpt import GPT, GPTConfig
from trainer.worker.kernels import (
    MIN_FEATURES,
    ContiguousGradLinear,
    transposed,
    use_contiguous_weight_grad,
    weight_grad,
)


@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (130, 5), (257, 64)])
def test_transposed_copies_exactly(shape):
    x = torch.randn(*shape)
    t = transposed(x)
    assert t.is_contiguous() and torch.equal(t, x.T)


@pytest.mark.parametrize(
    "n, d_in, d_out",
    [(64, 16, 48), (64, 48, 16), (37, 5, 300), (300, 200, 3)],  # both copy choices
)
def test_weight_grad_is_the_transposed_product(n, d_in, d_out):
    g = torch.randn(n, d_out, dtype=torch.float64)
    x = torch.randn(n, d_in, dtype=torch.float64)
    got = weight_grad(g, x)
    assert got.shape == (d_out, d_in) and got.is_contiguous()
    torch.testing.assert_close(got, g.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_nn_linear(bias):
    torch.manual_seed(0)
    ref = nn.Linear(24, 40, bias=bias).double()
    fast = nn.Linear(24, 40, bias=bias).double()
    fast.load_state_dict(ref.state_dict())
    fast.__class__ = ContiguousGradLinear
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(3, 7, 40, dtype=torch.float64)  # a loss whose gradient is not uniform
    (ref(xr) * w).sum().backward()
    (fast(xf) * w).sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)


def test_bf16_gradients_stay_close_to_the_fp32_ones():
    torch.manual_seed(0)
    x = torch.randn(64, MIN_FEATURES)
    g = torch.randn(64, MIN_FEATURES)
    exact = g.T @ x  # the weight gradient does not depend on the weights
    lb = nn.Linear(MIN_FEATURES, MIN_FEATURES).bfloat16()
    assert use_contiguous_weight_grad(lb) == 1
    xb = x.bfloat16().requires_grad_()
    lb(xb).backward(g.bfloat16())
    rel = (lb.weight.grad.float() - exact).norm() / exact.norm()
    assert rel < 1e-2  # bf16 rounding of inputs and output, as in aten's product


def test_swap_keeps_names_ties_and_small_layers():
    cfg = GPTConfig(vocab_size=MIN_FEATURES, block_size=8, n_layer=1, n_head=2, d_model=32)
    model = GPT(cfg)
    keys = list(model.state_dict())
    # d_model 32: no layer has MIN_FEATURES inputs and outputs, so nothing changes
    assert use_contiguous_weight_grad(model) == 0
    big = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=8, d_model=MIN_FEATURES))
    big_keys = list(big.state_dict())
    swapped = use_contiguous_weight_grad(big)
    kinds = {name: type(m) for name, m in big.named_modules()}
    # q, k, v, o, up, down of the one block; the 64-wide lm_head is left alone
    assert swapped == 6, kinds
    assert kinds["lm_head"] is nn.Linear
    assert list(big.state_dict()) == big_keys and list(model.state_dict()) == keys
    assert big.lm_head.weight is big.wte.weight  # the tie survives
    idx = torch.randint(0, 64, (2, 8))
    _, loss = big(idx, idx)
    loss.backward()
    assert all(p.grad is not None for p in big.parameters())
