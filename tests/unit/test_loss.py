"""The chunked loss (models/loss.py) against the plain F.cross_entropy of the whole fp32
logits: loss and every gradient within 1e-6 (relative to the largest value) in fp32, with
ignored (padding, -1) targets, chunks that do not divide the tokens, the GPT's own loss path
(tied and untied head) and the pipeline's loss; and the backward never holds more than one
chunk's logits."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from models import GPT, GPTConfig
from models.loss import chunked_cross_entropy, chunked_head_cross_entropy
from trainer.worker.parallel import lm_loss

V, C = 97, 32


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """|got - want| <= 1e-6 x max |want|, elementwise."""
    err = (got - want).abs().max().item()
    assert err <= 1e-6 * want.abs().max().item(), (err, want.abs().max().item())


def plain(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1), ignore_index=-1)


def data(seed: int = 0, B: int = 3, T: int = 23):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, -5:] = -1  # padding
    targets[2, :3] = -1
    return x, targets


@pytest.mark.parametrize("chunk", [1, 7, 16, 69, 1000])  # 69 = B * T: one chunk
@pytest.mark.parametrize("bias", [False, True])
def test_head_loss_and_grads_equal_the_plain_loss(chunk, bias):
    x, targets = data()
    torch.manual_seed(1)
    head = torch.nn.Linear(C, V, bias=bias)
    results = []
    for fn in (
        lambda h, x: plain(h(x), targets),
        lambda h, x: chunked_head_cross_entropy(h, x, targets, chunk),
    ):
        h = torch.nn.Linear(C, V, bias=bias)
        h.load_state_dict(head.state_dict())
        xi = x.clone().requires_grad_()
        loss = fn(h, xi)
        loss.backward()
        results.append((loss.detach(), xi.grad, {n: p.grad for n, p in h.named_parameters()}))
    (loss_a, gx_a, gp_a), (loss_b, gx_b, gp_b) = results
    close(loss_b, loss_a)
    close(gx_b, gx_a)
    for name in gp_a:
        close(gp_b[name], gp_a[name])


@pytest.mark.parametrize("chunk", [5, 69])
def test_logits_loss_equals_the_plain_loss(chunk):
    x, targets = data(seed=2)
    logits = torch.randn(3, 23, V, generator=torch.Generator().manual_seed(3))
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want, got = plain(a, targets), chunked_cross_entropy(b, targets, chunk)
    want.backward()
    got.backward()
    close(got.detach(), want.detach())
    close(b.grad, a.grad)
    # the pipeline's loss function is the same choice
    close(lm_loss(logits, targets, chunk), want.detach())
    assert torch.equal(lm_loss(logits, targets), want.detach())


def test_every_target_ignored_is_nan_as_in_the_plain_loss():
    x, _ = data()
    targets = torch.full((3, 23), -1)
    head = torch.nn.Linear(C, V)
    assert plain(head(x), targets).isnan()
    assert chunked_head_cross_entropy(head, x, targets, 8).isnan()


TINY = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, d_model=C)
LLAMA = dict(
    TINY, n_kv_head=2, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
    tie_embeddings=False,
)  # fmt: skip


@pytest.mark.parametrize("shape", [TINY, LLAMA], ids=["gpt2-tied", "llama-untied"])
def test_gpt_loss_path_with_chunks_equals_the_whole_logits(shape):
    idx = torch.randint(0, V, (2, 29), generator=torch.Generator().manual_seed(4))
    targets = torch.roll(idx, -1, dims=1)
    targets[1, -4:] = -1
    results = []
    for chunk in (0, 10):
        torch.manual_seed(5)
        model = GPT(GPTConfig(**shape))
        model.loss_chunk = chunk
        logits, loss = model(idx, targets)
        assert (logits is None) == bool(chunk)  # chunked: the whole logits never exist
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        close(grads_b[name], grads_a[name])
    # without targets (generation) the logits come back whole, as before
    model.loss_chunk = 10
    assert model(idx)[0].shape == (2, 29, V)


def test_backward_keeps_at_most_one_chunk_of_logits():
    """Every tensor autograd saves for backward, in elements, the head's weight aside: the
    plain loss saves the whole (N, V) log-softmax; the chunked one at most one chunk of it."""
    x, targets = data()
    head = torch.nn.Linear(C, V)
    N, chunk = 3 * 23, 16

    def largest_saved(fn) -> int:
        sizes = [0]

        def pack(t):
            if t.data_ptr() != head.weight.data_ptr():
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x.clone().requires_grad_())
        return max(sizes)

    assert largest_saved(lambda x: plain(head(x), targets)) >= N * V
    assert largest_saved(lambda x: chunked_head_cross_entropy(head, x, targets, chunk)) <= (
        chunk * V
    )
