"""Grouped-query attention reads the shared K/V heads in place (SDPA enable_gqa): the output
and every gradient equal (within 1e-6 of the largest value) those of the expansion it replaced (K/V repeat_interleave'd to the
query heads, then plain SDPA), in fp32, with RoPE and with learned positions."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from models.gpt import CausalSelfAttention, GPTConfig


def close(got: torch.Tensor, want: torch.Tensor, scale: float | None = None) -> None:
    """|got - want| <= 1e-6 x scale (default max |want|), elementwise (fp32: the same sums in
    another order)."""
    scale = want.abs().max().item() if scale is None else scale
    err = (got - want).abs().max().item()
    assert err <= 1e-6 * scale, (err, scale)


def expanded(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The attention as it was computed before enable_gqa (models/gpt.py until this change)."""
    B, T, _ = x.size()
    q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
    k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, KV, T, D)
    v = attn.v_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, KV, T, D)
    if attn.rotary is not None:
        q, k = attn.rotary(q, k)
    n_rep = q.size(1) // k.size(1)
    k = k.repeat_interleave(n_rep, dim=1)  # (B, H, T, D)
    v = v.repeat_interleave(n_rep, dim=1)  # (B, H, T, D)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.o_proj(y.transpose(1, 2).contiguous().view(B, T, -1))


@pytest.mark.parametrize("kv", [1, 2, 4])  # MQA, GQA, MHA (nothing shared)
@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_enable_gqa_equals_the_repeat_interleave_expansion(kv, pos):
    cfg = GPTConfig(vocab_size=64, block_size=32, n_head=8, n_kv_head=kv, d_model=64,
                    pos_embedding=pos)  # fmt: skip
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg)
    x = torch.randn(3, 19, 64)
    results = []
    for fn in (expanded, lambda a, x: a(x)):
        attn.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(attn, xi)
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
        results.append((out.detach(), xi.grad, grads))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    close(out_b, out_a)
    close(gx_b, gx_a)
    # the key bias's gradient is 0 up to rounding (softmax ignores a shift of every score):
    # every parameter's gradient is held to the largest one's scale
    scale = max(g.abs().max().item() for g in gp_a.values())
    for name in gp_a:
        close(gp_b[name], gp_a[name], scale)
