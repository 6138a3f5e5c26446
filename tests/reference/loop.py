"""An independent reference: a plain PyTorch training loop that shares no code with raygpt's
trainer.

It imports nothing from trainer/, cluster/ or data_pipeline/. Its shared inputs are the model
(models/gpt.py) and a prepared dataset (manifest.json + Parquet token shards, read here with
pyarrow). Everything a training run adds to the model is written here again from raygpt's
documented rules, not from its code, so a bug that every raygpt layout shares shows up as a
difference from this loop:

- initial weights: every module that owns parameters is initialised by
  GPT.init_module_weights from its own CPU generator seeded with crc32(f"{seed}:{name}")
  (modules in named_modules() order, so the tied head re-draws the shared matrix last);
- data order: global step k (1-based) trains on positions [(k-1) G, k G) of the keyed order,
  G = global batch; N = rows of the train split (shards concatenated in manifest order).
  The order is "blocks-v1" with chunk C = 1024 and window W = 16 (data.order_chunk,
  data.order_window), written here from data_pipeline/order.py's docstring: position p is in
  epoch e = p // N at q = p mod N; q's window is q // (W C); inside it q's slot is the window's
  start plus a keyed Feistel permutation (cycle walking, 6 rounds of a splitmix64 mixer) of the
  window's length at q mod (W C); the slot's chunk (slot // C), when a full one, is moved by the
  epoch's Feistel permutation of the full chunks, keeping the in-chunk row. A row of
  seq_len + 1 tokens gives inputs row[:-1] and targets row[1:]; the positions of a step are cut
  into consecutive micro batches;
- loss: mean token cross-entropy (in fp32) of each micro batch; the step's loss is the mean
  over its micro batches; the gradient is that mean's gradient (gradient accumulation);
- gradient clipping: all gradients scaled by min(1, max_norm / (||g||_2 + 1e-6)), the global
  L2 norm over every parameter (a tied matrix counted once);
- optimizer: AdamW (decoupled weight decay, bias-corrected moments), weight decay on the
  weights of Linear and Embedding modules only (not on biases or norm gains);
- learning rate of step s (1-based): linear warmup peak * s / warmup for s <= warmup, then
  cosine (or linear) decay from peak to peak * min_lr_ratio at max_steps, or constant.

Used by tests/dist/test_reference_parity.py and tests/reference/make_golden.py.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.nn import functional as F

from models.gpt import GPT, GPTConfig


@dataclass(frozen=True)
class Recipe:
    """The run settings of the reference loop (raygpt's conf names in comments)."""

    steps: int  # trainer.max_steps
    global_batch: int  # trainer.global_batch_size
    micro_batch: int  # trainer.micro_batch_size
    seed: int = 1337  # trainer.seed (weights and data order)
    lr: float = 1e-3  # optim.lr
    min_lr_ratio: float = 0.1  # optim.min_lr_ratio
    warmup: int = 30  # optim.warmup_steps
    schedule: str = "cosine"  # optim.schedule: cosine | linear | constant
    weight_decay: float = 0.1  # optim.weight_decay
    betas: tuple[float, float] = (0.9, 0.95)  # optim.beta1, optim.beta2
    eps: float = 1e-8  # optim.eps
    max_norm: float = 1.0  # optim.grad_clip (0: no clipping)


# ---------------------------------------------------------------------------------- data


def train_rows(data_dir: str | Path) -> np.ndarray:
    """Every row (N, seq_len + 1) of the train split, shards in the manifest's order."""
    data_dir = Path(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    row_len = manifest["seq_len"] + 1
    parts = []
    for shard in manifest["splits"]["train"]["shards"]:
        column = pq.read_table(data_dir / shard["file"], columns=["tokens"]).column("tokens")
        flat = np.concatenate([chunk.flatten().to_numpy() for chunk in column.chunks])
        rows = flat.astype(np.int64).reshape(-1, row_len)
        assert len(rows) == shard["rows"], (shard, len(rows))
        parts.append(rows)
    return np.concatenate(parts)


_U64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def _splitmix(z: int) -> int:
    """splitmix64's output function, on Python ints kept to 64 bits."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _U64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _U64
    return z ^ (z >> 31)


def _key(*parts: int) -> int:
    k = 0
    for part in parts:
        k = _splitmix(k ^ _splitmix((part + _GOLDEN_GAMMA) & _U64))
    return k


def _permute(x: int, size: int, k: int) -> int:
    """Keyed permutation of range(size) at x: a balanced 6-round Feistel network on 2 * half
    bits (4 ** half >= size), applied again until the result falls inside range(size)."""
    half = max(1, -(-(size - 1).bit_length() // 2))
    low = (1 << half) - 1
    while True:
        a, b = x >> half, x & low
        for r in range(6):
            f = _splitmix(_splitmix(k ^ _splitmix(r + _GOLDEN_GAMMA)) ^ b) & low
            a, b = b, a ^ f
        x = a << half | b
        if x < size:
            return x


def sample_id(position: int, n: int, seed: int, chunk: int = 1024, window: int = 16) -> int:
    epoch, q = divmod(position, n)
    span = chunk * window
    w = q // span
    start = w * span
    slot = start + _permute(q - start, min(span, n - start), _key(seed, epoch, 1, w))
    full_chunks = n // chunk
    if slot // chunk >= full_chunks:  # the partial last chunk keeps its place
        return slot
    moved = _permute(slot // chunk, full_chunks, _key(seed, epoch, 0))
    return moved * chunk + slot % chunk


def step_sample_ids(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """The sample ids of global step `step` (1-based), in training order."""
    first = (step - 1) * global_batch
    return [sample_id(p, n, seed) for p in range(first, first + global_batch)]


# ------------------------------------------------------------------------- initial weights


def init_weights(model: GPT, seed: int) -> None:
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        model.init_module_weights(module, generator=generator)


# ------------------------------------------------------------------------------ optimizer


def learning_rate(step: int, r: Recipe) -> float:
    if r.warmup > 0 and step <= r.warmup:
        return r.lr * step / r.warmup
    if r.schedule == "constant":
        return r.lr
    low = r.lr * r.min_lr_ratio
    done = min(1.0, (step - r.warmup) / max(1, r.steps - r.warmup))
    if r.schedule == "linear":
        return r.lr + (low - r.lr) * done
    return low + (r.lr - low) * (1.0 + math.cos(math.pi * done)) / 2.0


def decayed(model: nn.Module) -> set[int]:
    """ids of the parameters that get weight decay: Linear and Embedding weights."""
    return {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}


class AdamW:
    """Loshchilov & Hutter's AdamW, one parameter at a time."""

    def __init__(self, params: list[nn.Parameter], decay: set[int], r: Recipe):
        self.params, self.r = params, r
        self.decay = [r.weight_decay if id(p) in decay else 0.0 for p in params]
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        b1, b2 = self.r.betas
        c1, c2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        for p, m, v, wd in zip(self.params, self.m, self.v, self.decay):
            g = p.grad
            p.mul_(1.0 - lr * wd)
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            p.sub_(lr * (m / c1) / ((v / c2).sqrt() + self.r.eps))


@torch.no_grad()
def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Scales the gradients to a global L2 norm of at most max_norm; the norm before."""
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    if max_norm > 0:
        scale = min(1.0, max_norm / (norm + 1e-6))
        for p in params:
            p.grad.mul_(scale)
    return norm


# ---------------------------------------------------------------------------------- loop


def train(model_cfg: GPTConfig, data_dir: str | Path, r: Recipe) -> list[dict]:
    """r.steps optimizer steps, fp32 on the CPU; one row per step: step, loss, lr,
    grad_norm (before clipping), consumed_samples."""
    if r.global_batch % r.micro_batch:
        raise ValueError(f"global batch {r.global_batch} is not a multiple of {r.micro_batch}")
    torch.manual_seed(r.seed)
    model = GPT(model_cfg)
    init_weights(model, r.seed)
    model.train()
    params = list(model.parameters())  # a tied matrix once
    opt = AdamW(params, decayed(model), r)
    rows = train_rows(data_dir)
    accum = r.global_batch // r.micro_batch
    out = []
    for step in range(1, r.steps + 1):
        ids = step_sample_ids(step, r.global_batch, len(rows), r.seed)
        batch = torch.from_numpy(rows[ids])  # (G, T + 1)
        for p in params:
            p.grad = torch.zeros_like(p)
        losses = []
        for micro in batch.split(r.micro_batch):
            x, y = micro[:, :-1], micro[:, 1:]  # (B, T) each
            logits, _ = model(x)  # (B, T, V); the model's own loss is not used
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / accum).backward()
            losses.append(loss.item())
        norm = clip_gradients(params, r.max_norm)
        lr = learning_rate(step, r)
        opt.step(lr)
        out.append(
            {
                "step": step,
                "loss": sum(losses) / len(losses),
                "lr": lr,
                "grad_norm": norm,
                "consumed_samples": step * r.global_batch,
            }
        )
    return out
