"""The blocks-v1 data order (data_pipeline/order.py): a keyed bijection per epoch, computed per
position in O(batch) memory, whose consecutive positions stay within a few chunks.

Expected values come from a scalar re-implementation of the module docstring's spec below
(Python ints), written from the text, not from the vectorised code."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from data_pipeline.order import BLOCKS, PERMUTATION, Order, sample_ids_at

MASK = (1 << 64) - 1
G64 = 0x9E3779B97F4A7C15


def mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def key(*values: int) -> int:
    k = 0
    for v in values:
        k = mix(k ^ mix((v + G64) & MASK))
    return k


def feistel(x: int, m: int, k: int) -> int:
    h = max(1, math.ceil((m - 1).bit_length() / 2))
    mask = (1 << h) - 1
    while True:
        left, right = x >> h, x & mask
        for r in range(6):
            left, right = right, left ^ (mix(mix(k ^ mix(r + G64)) ^ right) & mask)
        x = (left << h) | right
        if x < m:
            return x


def spec_id(p: int, n: int, seed: int, c: int, w: int) -> int:
    epoch, q = divmod(p, n)
    span = c * w
    window, o = divmod(q, span)
    length = min(span, n - window * span)
    slot = window * span + feistel(o, length, key(seed, epoch, 1, window))
    full = n // c
    chunk, row = divmod(slot, c)
    if chunk >= full:
        return slot
    return feistel(chunk, full, key(seed, epoch, 0)) * c + row


SIZES = [1, 2, 3, 7, 31, 97, 1000, 1023, 1024, 1025, 4099, 65537]  # primes, N < C, N % C != 0
SHAPES = [(1, 1), (4, 2), (7, 3), (64, 16), (1024, 16)]  # (chunk, window)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("chunk,window", SHAPES)
def test_every_epoch_is_a_bijection(n: int, chunk: int, window: int) -> None:
    ids = sample_ids_at(np.arange(3 * n), n, seed=11, chunk=chunk, window=window)
    assert ids.dtype == np.int64
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(ids[epoch * n : (epoch + 1) * n]), np.arange(n))


@pytest.mark.parametrize("n,chunk,window", [(1, 4, 2), (10, 4, 2), (97, 7, 3), (5000, 64, 4)])
def test_matches_the_documented_spec(n: int, chunk: int, window: int) -> None:
    rng = np.random.default_rng(0)
    positions = np.unique(np.concatenate([np.arange(min(n, 50)), rng.integers(0, 5 * n, 200)]))
    got = sample_ids_at(positions, n, seed=5, chunk=chunk, window=window)
    assert got.tolist() == [spec_id(int(p), n, 5, chunk, window) for p in positions]
    big = np.array([10**12 + 3, 7 * 10**11 + 12345])  # far epochs of a huge corpus
    got = sample_ids_at(big, 10**9, seed=2**40 + 1)
    assert got.tolist() == [spec_id(int(p), 10**9, 2**40 + 1, 1024, 16) for p in big]


def test_epochs_and_seeds_give_other_orders() -> None:
    n = 5000
    a = sample_ids_at(np.arange(2 * n), n, seed=1, chunk=16, window=4)
    b = sample_ids_at(np.arange(n), n, seed=2, chunk=16, window=4)
    assert not np.array_equal(a[:n], a[n:]) and not np.array_equal(a[:n], b)
    assert np.mean(a[:n] == np.arange(n)) < 0.05  # shuffled, not the identity
    chunks0, chunks1 = a[:n:16] // 16, a[n : 2 * n : 16] // 16  # chunks in another order
    assert np.mean(chunks0 == chunks1) < 0.2
    # within a window, a sample's place is shuffled too: not whole chunks in their row order
    assert np.mean(np.diff(a[:64]) == 1) < 0.25


@pytest.mark.parametrize("n,chunk,window", [(100_000, 64, 4), (1_000_003, 1024, 16), (9_999, 7, 5)])
def test_a_step_touches_a_bounded_number_of_chunks(n: int, chunk: int, window: int) -> None:
    rng = np.random.default_rng(3)
    for g in (1, 64, 512, 3 * chunk * window + 5):
        bound = (math.ceil(g / (chunk * window)) + 1) * window
        for start in rng.integers(0, 3 * n, 20):
            ids = sample_ids_at(start + np.arange(g), n, seed=9, chunk=chunk, window=window)
            epochs = len(np.unique((start + np.arange(g)) // n))
            assert len(np.unique(ids // chunk)) <= bound * epochs + epochs


def test_the_partial_chunk_stays_in_the_last_window() -> None:
    n, chunk, window = 1000, 64, 4  # 15 full chunks + 40 ids; windows of 256 positions
    ids = sample_ids_at(np.arange(n), n, seed=4, chunk=chunk, window=window)
    partial = np.nonzero(ids >= 15 * chunk)[0]
    assert len(partial) == 40 and partial.min() >= 3 * 256


def test_memory_does_not_grow_with_the_corpus() -> None:
    positions = np.arange(10**12 - 64, 10**12, dtype=np.int64)
    peaks = []
    for n in (10**6, 10**9, 10**12):
        tracemalloc.start()
        ids = sample_ids_at(positions, n, seed=1)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert ((ids >= 0) & (ids < n)).all()
    assert max(peaks) < 256 << 10, peaks  # a few KB for 64 positions, whatever N


def test_shapes_and_bad_arguments() -> None:
    grid = np.arange(12).reshape(3, 4)
    assert sample_ids_at(grid, 5, seed=0).shape == (3, 4)
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        sample_ids_at(np.arange(3), 0, seed=0)
    with pytest.raises(ValueError, match="chunk and window must be >= 1"):
        sample_ids_at(np.arange(3), 10, seed=0, chunk=0)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        sample_ids_at(np.array([-1]), 10, seed=0)
    with pytest.raises(ValueError, match="order 'shuffled' is not one of"):
        Order("shuffled")


def test_order_records_itself_in_the_loader_state() -> None:
    order = Order(BLOCKS, chunk=8, window=3)
    assert order.state() == {"order": "blocks-v1", "order_chunk": 8, "order_window": 3}
    assert Order.from_state({"consumed_samples": 5, **order.state()}) == order
    assert Order.from_state({"consumed_samples": 5}) == Order(PERMUTATION)  # older checkpoints
    assert Order(PERMUTATION).state() == {}
    positions = np.arange(40)
    np.testing.assert_array_equal(
        Order(PERMUTATION).sample_ids(positions, 20, seed=3),
        np.concatenate([np.random.default_rng([3, e]).permutation(20) for e in (0, 1)]),
    )
    np.testing.assert_array_equal(
        order.sample_ids(positions, 20, seed=3),
        [spec_id(p, 20, 3, 8, 3) for p in range(40)],
    )
    for kind in (order, Order(PERMUTATION)):
        np.testing.assert_array_equal(
            kind.sample_ids(positions, 7, 3, shuffle=False), positions % 7
        )
