"""The data order: which sample id sits at each global position, in O(batch) memory.

Position p (the global count of samples consumed before it) belongs to epoch e = p // N and to
offset q = p % N of that epoch (N = samples of the split). The order is a pure function of
(seed, p), so resume needs only the position and the union of a step does not depend on the
data-parallel size. Nothing of size N is ever built: each position is mapped on its own,
vectorised over numpy arrays.

"blocks-v1" (BLOCKS, the default for new runs), with settings C = chunk and W = window:

- Samples [0, N) are cut into chunks of C consecutive ids: F = N // C full chunks and, when
  C does not divide N, one partial chunk F holding the last N - F * C ids.
- Epoch e puts the full chunks in the order P_c = feistel(F, K_c), K_c = key(seed, e, 0):
  chunk slot j < F holds chunk P_c(j); the partial chunk stays last (slot F).
- The chunk slots laid end to end give N sample slots: slot s is in-chunk row s % C of the
  chunk at slot s // C. They are cut into windows of W * C slots (the last one may be
  shorter): window w covers slots [w * W * C, w * W * C + L_w), L_w = min(W * C, N - w * W * C).
- Offset q lies in window w = q // (W * C) at o = q % (W * C); its slot is
  s = w * W * C + feistel(L_w, K_w)(o), K_w = key(seed, e, 1, w).
- Sample id = P_c(s // C) * C + s % C when s // C < F, else s (the partial chunk's ids).

So every epoch is a bijection on [0, N), and the positions of one window come from its W chunks
only: G consecutive positions touch at most ceil(G / (W * C)) + 1 windows, i.e. a bounded number
of chunks (C equal to the shards' row-group size keeps reads row-group sized and sequential).

The arithmetic (all unsigned 64-bit, wrapping; G64 = 0x9E3779B97F4A7C15):

- mix(z): z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
  return z ^ (z >> 31)  (the splitmix64 finaliser).
- key(v1, ..., vn): k = 0, then for each v in turn k = mix(k ^ mix(v + G64)).
- feistel(M, K) permutes [0, M), M >= 1: h = max(1, ceil(b / 2)) with b the bit length of
  M - 1, mask = 2^h - 1. One pass maps x to (L, R) = (x >> h, x & mask), then for r = 0..5:
  (L, R) = (R, L ^ (mix(mix(K ^ mix(r + G64)) ^ R) & mask)), and returns (L << h) | R, a
  bijection on [0, 4^h). Cycle walking: apply passes until the value is below M (a bijection
  on [0, M) since the cycle of x, which starts in [0, M), returns to it).

"permutation" (PERMUTATION, every run before blocks-v1 and every checkpoint without an "order"
in its loader state): position p is numpy.random.default_rng([seed, e]).permutation(N)[q],
which materialises N ids per epoch (8 bytes a sample). Kept only so those runs resume exactly.

shuffle=False (the validation loader) is the identity order, q, whatever the kind.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

BLOCKS = "blocks-v1"
PERMUTATION = "permutation"
KINDS = (BLOCKS, PERMUTATION)
DEFAULT_CHUNK = 1024  # data.order_chunk: the row-group size prepare writes
DEFAULT_WINDOW = 16  # data.order_window: chunks shuffled together
ROUNDS = 6

_G64 = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


_ROUND_CONSTANTS = _mix(np.arange(ROUNDS, dtype=np.uint64) + _G64)


def _u64(values: Any) -> np.ndarray:
    return np.atleast_1d(np.asarray(values, dtype=np.int64)).astype(np.uint64)


def key(*values: Any) -> np.ndarray:
    """key(v1, ..., vn) of the module docstring, element-wise over arrays (uint64)."""
    k = np.zeros(1, dtype=np.uint64)
    for v in values:
        k = _mix(k ^ _mix(_u64(v) + _G64))
    return k


def _half_bits(m: np.ndarray) -> np.ndarray:
    """h per domain size m >= 1: the smallest h >= 1 with 4^h >= m."""
    bits = np.zeros(m.shape, dtype=np.uint64)
    rest = (m - 1).astype(np.uint64)
    while rest.any():
        bits += rest > 0
        rest >>= np.uint64(1)
    return np.maximum(np.uint64(1), (bits + np.uint64(1)) >> np.uint64(1))


def _feistel_pass(x: np.ndarray, k: np.ndarray, h: np.ndarray) -> np.ndarray:
    mask = (np.uint64(1) << h) - np.uint64(1)
    left, right = x >> h, x & mask
    for r in range(ROUNDS):
        round_key = _mix(k ^ _ROUND_CONSTANTS[r])
        left, right = right, left ^ (_mix(round_key ^ right) & mask)
    return (left << h) | right


def feistel(x: np.ndarray, m: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The keyed permutation of [0, m) at x (arrays broadcast together; 0 <= x < m)."""
    x, m, k = (a.astype(np.uint64) for a in np.broadcast_arrays(x, m, k))
    h = _half_bits(m)
    y = _feistel_pass(x, k, h)
    todo = np.nonzero(y >= m)[0]
    while todo.size:  # cycle walking
        y[todo] = _feistel_pass(y[todo], k[todo], h[todo])
        todo = todo[y[todo] >= m[todo]]
    return y.astype(np.int64)


def sample_ids_at(
    positions: np.ndarray,
    num_samples: int,
    seed: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    window: int = DEFAULT_WINDOW,
) -> np.ndarray:
    """Sample ids (int64) at global positions (int64 >= 0) in the blocks-v1 order of a split of
    num_samples samples; see the module docstring. Memory O(len(positions))."""
    _check(num_samples, chunk, window)
    p = np.asarray(positions, dtype=np.int64)
    shape = p.shape
    p = p.reshape(-1)
    if p.size and p.min() < 0:
        raise ValueError(f"positions must be >= 0, got {int(p.min())}")
    n, span = int(num_samples), int(chunk) * int(window)
    epoch, q = p // n, p % n
    w, o = q // span, q % span
    length = np.minimum(span, n - w * span)
    slot = w * span + feistel(o, length, key(seed, epoch, 1, w))
    full = n // chunk
    c, row = slot // chunk, slot % chunk
    ids = slot.copy()
    inner = np.nonzero(c < full)[0]
    if inner.size:
        moved = feistel(c[inner], np.int64(full), key(seed, epoch[inner], 0))
        ids[inner] = moved * chunk + row[inner]
    return ids.reshape(shape)


def _check(num_samples: int, chunk: int, window: int) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if chunk < 1 or window < 1:
        raise ValueError(f"order chunk and window must be >= 1, got {chunk} and {window}")


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    perm.flags.writeable = False
    return perm


def permutation_ids_at(positions: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    """The "permutation" order (checkpoints written before blocks-v1): O(N) per epoch."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    positions = np.asarray(positions, dtype=np.int64)
    offsets, epochs = positions % num_samples, positions // num_samples
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        where = epochs == epoch
        out[where] = _epoch_permutation(num_samples, seed, int(epoch))[offsets[where]]
    return out


@dataclass(frozen=True)
class Order:
    """Which order a loader uses (kind, and chunk/window for blocks-v1); recorded in the
    loader's checkpointed state so a resumed run keeps the order it started with."""

    kind: str = BLOCKS
    chunk: int = DEFAULT_CHUNK
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"order {self.kind!r} is not one of {', '.join(KINDS)}")
        _check(1, self.chunk, self.window)

    def sample_ids(
        self, positions: np.ndarray, num_samples: int, seed: int, shuffle: bool = True
    ) -> np.ndarray:
        """Sample ids at `positions` in this order (identity modulo N when not shuffled)."""
        positions = np.asarray(positions, dtype=np.int64)
        if not shuffle:
            _check(num_samples, 1, 1)
            return positions % num_samples
        if self.kind == PERMUTATION:
            return permutation_ids_at(positions, num_samples, seed)
        return sample_ids_at(positions, num_samples, seed, chunk=self.chunk, window=self.window)

    def state(self) -> dict[str, Any]:
        """The loader-state keys naming this order (none for the legacy permutation, whose
        checkpoints never had them)."""
        if self.kind == PERMUTATION:
            return {}
        return {"order": self.kind, "order_chunk": self.chunk, "order_window": self.window}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Order:
        """The order a loader state records; a state without "order" is the permutation."""
        if "order" not in state:
            return cls(PERMUTATION)
        return cls(str(state["order"]), int(state["order_chunk"]), int(state["order_window"]))
