"""TokenShards / DistributedLoader on a small synthetic dataset (no Ray, no tokenizer)."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.config import DataError
from data_pipeline.loader import (
    DistributedLoader,
    ShardCache,
    TokenShards,
    sample_id_at,
    sample_ids_at,
)
from data_pipeline.manifest import (
    MANIFEST_VERSION,
    Manifest,
    ShardInfo,
    SplitInfo,
    TokenizerInfo,
)

SEQ_LEN = 8
ROW = SEQ_LEN + 1
SHARD_ROWS = [7, 5, 11, 1, 8]  # uneven on purpose: 32 samples
N = sum(SHARD_ROWS)


def expected_row(sample_id: int) -> np.ndarray:
    """Row i of the synthetic data: i * 100 + [0, 1, ..., seq_len]."""
    return sample_id * 100 + np.arange(ROW, dtype=np.int32)


def write_dataset(root: Path, shard_rows: list[int], *, fixed_size: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shards, first = [], 0
    for k, rows in enumerate(shard_rows):
        values = np.concatenate([expected_row(first + i) for i in range(rows)])
        flat = pa.array(values, type=pa.int32())
        if fixed_size:
            column = pa.FixedSizeListArray.from_arrays(flat, ROW)
        else:
            column = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1) * ROW, pa.int32()), flat)
        name = f"train-00000-{k:03d}.parquet"
        pq.write_table(pa.table({"tokens": column}), root / name, compression="zstd")
        shards.append(ShardInfo(file=name, rows=rows))
        first += rows
    Manifest(
        version=MANIFEST_VERSION,
        name="synthetic",
        tokenizer=TokenizerInfo(file="tokenizer.json", sha256="0" * 64, vocab_size=5000, eos_id=0),
        seq_len=SEQ_LEN,
        splits={
            "train": SplitInfo(shards=shards, num_samples=first, num_tokens=first * ROW),
            "val": SplitInfo(),
        },
        sources=["synthetic"],
        num_documents={"train": first, "val": 0},
        settings={},
        fingerprint="",
        created="2024-01-01T00:00:00+00:00",
    ).save(root)
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> TokenShards:
    return TokenShards(str(write_dataset(tmp_path_factory.mktemp("ds"), SHARD_ROWS)), "train")


def make_loader(shards: TokenShards, **kwargs: object) -> DistributedLoader:
    args: dict = dict(global_batch=8, micro_batch=2, dp_rank=0, dp_size=1, seed=7)
    args.update(kwargs)
    return DistributedLoader(shards, **args)


def ids_of_step(step: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """Recover sample ids from the synthetic token values (first input token = id * 100)."""
    return [int(x) // 100 for inputs, _ in step for x in inputs[:, 0]]


# ---------------------------------------------------------------------------- TokenShards


@pytest.mark.parametrize("fixed_size", [True, False])
def test_token_shards_random_access(tmp_path: Path, fixed_size: bool) -> None:
    ds = TokenShards(str(write_dataset(tmp_path, SHARD_ROWS, fixed_size=fixed_size)), "train")
    assert len(ds) == N
    for i in range(N):
        np.testing.assert_array_equal(ds[i], expected_row(i))
    ids = np.array([31, 0, 12, 12, 6, 7, 23, 24])  # several shards, repeats, unsorted
    batch = ds.get_batch(ids)
    assert batch.shape == (len(ids), ROW) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, np.stack([expected_row(i) for i in ids]))
    with pytest.raises(IndexError):
        ds[N]
    with pytest.raises(IndexError):
        ds.get_batch(np.array([0, -1]))


def test_token_shards_lru_cache_and_errors(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", SHARD_ROWS)
    ds = TokenShards(str(root), "train", cache_shards=2)
    for i in range(N):
        ds[i]
    assert len(ds._cache) == 2
    np.testing.assert_array_equal(ds[0], expected_row(0))  # evicted shard is read again
    assert len(TokenShards(str(root), "val")) == 0
    with pytest.raises(DataError, match="split 'test'"):
        TokenShards(str(root), "test")
    with pytest.raises(DataError, match="no manifest.json in"):
        TokenShards(str(tmp_path / "nothing"), "train")


# ---------------------------------------------------------------------------- the shard cache
# A local dataset read through a ShardCache stands in for a remote one: the cache copies each
# shard in through storage exactly as it downloads from an object store.


EVEN = [6] * 5  # shards of one size (give or take a few compressed bytes)


def cache_dataset(root: Path) -> tuple[Path, int]:
    """A dataset of EVEN shards and the size of its largest shard file."""
    write_dataset(root, EVEN)
    sizes = [(root / f"train-00000-{k:03d}.parquet").stat().st_size for k in range(len(EVEN))]
    assert 4 * min(sizes) > 3 * max(sizes)  # so a bound of 3 * max holds exactly 3 shards
    return root, max(sizes)


def test_shard_cache_stays_under_its_bound_lru_first_out(tmp_path: Path) -> None:
    root, size = cache_dataset(tmp_path / "ds")
    bound = 3 * size
    cache = ShardCache(tmp_path / "cache", max_bytes=bound)
    ds = TokenShards(str(root), "train", cache_shards=1, cache=cache)

    def read(shard: int) -> None:
        np.testing.assert_array_equal(ds[6 * shard], expected_row(6 * shard))
        assert cache.total_bytes() <= bound

    for i in range(len(ds)):  # every sample, in order: each shard fetched once
        np.testing.assert_array_equal(ds[i], expected_row(i))
        assert cache.total_bytes() <= bound
    assert cache.downloads == 5 and len(cache.cached()) == 3  # shards 2, 3, 4
    read(2)  # used again: now the most recent
    read(0)  # evicted before: fetched again, evicting shard 3 (the least recently used)
    assert cache.downloads == 6
    read(4)
    read(2)  # both still cached
    assert cache.downloads == 6
    read(3)
    assert cache.downloads == 7
    # the same rows as reading in place
    in_place = TokenShards(str(root), "train")
    assert in_place.file_cache is None
    every = np.arange(len(ds))
    np.testing.assert_array_equal(ds.get_batch(every), in_place.get_batch(every))
    assert cache.total_bytes() <= bound


def test_shard_cache_shared_directory_and_leftovers(tmp_path: Path) -> None:
    root, size = cache_dataset(tmp_path / "ds")
    directory = tmp_path / "cache"
    directory.mkdir()
    stale = directory / ".abc.parquet.1234.tmp"  # a partial download of a dead process
    stale.write_bytes(b"x" * 10)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = directory / ".def.parquet.5678.tmp"  # one in progress: not touched
    fresh.write_bytes(b"y")
    bound = 2 * size
    first = ShardCache(directory, max_bytes=bound)
    second = ShardCache(directory, max_bytes=bound)  # another process on the same machine
    a = TokenShards(str(root), "train", cache_shards=1, cache=first)
    b = TokenShards(str(root), "train", cache_shards=1, cache=second)
    a[0]
    b[0]  # found in the shared directory
    assert (first.downloads, second.downloads) == (1, 0)
    b[6]
    a[12]  # makes room in the shared directory: removes shard 0, the least recently used
    assert first.total_bytes() <= bound and len(first.cached()) == 2
    assert not stale.exists() and fresh.exists()
    b[0]  # removed: fetched again
    assert (first.downloads, second.downloads) == (2, 2)
    # each version of a dataset (fingerprint and creation time) has its own copies
    other = TokenShards(str(root), "train", cache=first)
    other._version += "|prepared again"
    other[0]
    assert first.downloads == 3


def test_shard_cache_file_larger_than_the_bound_is_read_directly(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", SHARD_ROWS)
    cache = ShardCache(tmp_path / "cache", max_bytes=100)
    ds = TokenShards(str(root), "train", cache=cache)
    np.testing.assert_array_equal(ds.get_batch(np.arange(N)), np.stack(
        [expected_row(i) for i in range(N)]
    ))  # fmt: skip
    assert cache.downloads == 0 and cache.total_bytes() == 0
    with pytest.raises(ValueError, match="max_bytes must be >= 1"):
        ShardCache(tmp_path / "c", max_bytes=0)


# ---------------------------------------------------------------------------- sample order


def test_sample_id_at_is_a_seeded_permutation_per_epoch() -> None:
    epoch0 = [sample_id_at(p, N, seed=3) for p in range(N)]
    epoch1 = [sample_id_at(p, N, seed=3) for p in range(N, 2 * N)]
    assert sorted(epoch0) == list(range(N)) and sorted(epoch1) == list(range(N))
    assert epoch0 != epoch1 and epoch0 != list(range(N))
    np.testing.assert_array_equal(np.random.default_rng([3, 1]).permutation(N), epoch1)
    positions = np.arange(5, 3 * N, 7)
    assert sample_ids_at(positions, N, 3).tolist() == [sample_id_at(p, N, 3) for p in positions]
    assert sample_ids_at(positions, N, 3, shuffle=False).tolist() == (positions % N).tolist()


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_epoch_reads_every_sample_once(shards: TokenShards, dp_size: int) -> None:
    loaders = [make_loader(shards, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    seen: Counter[int] = Counter()
    for _ in range(N // 8):
        for loader in loaders:
            step = loader.next_step()
            assert len(step) == 8 // (2 * dp_size)  # grad_accum
            seen.update(ids_of_step(step))
    assert seen == Counter(range(N))
    assert all(loader.consumed_samples == N for loader in loaders)


def test_union_of_ranks_equals_single_rank_order(shards: TokenShards) -> None:
    single = make_loader(shards, global_batch=12, micro_batch=3)
    pair = [
        make_loader(shards, global_batch=12, micro_batch=3, dp_rank=r, dp_size=2) for r in (0, 1)
    ]
    for step in range(6):  # crosses epoch boundaries (N = 32 is not a multiple of 12)
        consumed = step * 12
        ids = single.sample_ids_for_step(consumed).tolist()
        split = [loader.sample_ids_for_step(consumed).tolist() for loader in pair]
        assert split[0] + split[1] == ids  # rank r holds the r-th contiguous slice
        assert ids_of_step(single.next_step()) == ids
        assert [ids_of_step(loader.next_step()) for loader in pair] == split


def test_step_tensors_are_shifted_inputs_and_targets(shards: TokenShards) -> None:
    loader = make_loader(shards, prefetch=False)
    ids = loader.sample_ids_for_step(0)
    step = loader.next_step()
    assert len(step) == 4
    rows = np.stack([expected_row(i) for i in ids]).reshape(4, 2, ROW)
    for (inputs, targets), expected in zip(step, rows):
        assert inputs.dtype == torch.int64 and targets.dtype == torch.int64
        assert inputs.shape == (2, SEQ_LEN) and targets.shape == (2, SEQ_LEN)
        np.testing.assert_array_equal(inputs.numpy(), expected[:, :-1])
        np.testing.assert_array_equal(targets.numpy(), expected[:, 1:])
    assert loader.consumed_samples == 8


def test_same_seed_same_order_other_seed_other_order(shards: TokenShards) -> None:
    def run(seed: int) -> list[list[int]]:
        loader = make_loader(shards, seed=seed)
        return [ids_of_step(loader.next_step()) for _ in range(4)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_shuffle_false_is_identity_order(shards: TokenShards) -> None:
    loader = make_loader(shards, shuffle=False, global_batch=4, micro_batch=2)
    assert [i for _ in range(9) for i in ids_of_step(loader.next_step())] == [
        p % N for p in range(36)
    ]


@pytest.mark.parametrize("prefetch", [True, False])
def test_resume_from_consumed_samples(shards: TokenShards, prefetch: bool) -> None:
    full = make_loader(shards, dp_rank=1, dp_size=2, prefetch=prefetch)
    steps = [full.next_step() for _ in range(7)]
    for k in (0, 3, 5):
        resumed = make_loader(shards, dp_rank=1, dp_size=2, consumed_samples=k * 8)
        for expected in steps[k:]:
            got = resumed.next_step()
            for (x, y), (ex, ey) in zip(got, expected):
                assert torch.equal(x, ex) and torch.equal(y, ey)
    # state_dict round trip restores position and seed
    other = make_loader(shards, dp_rank=1, dp_size=2, seed=99)
    state = make_loader(shards, dp_rank=1, dp_size=2, consumed_samples=16).state_dict()
    assert state == {"consumed_samples": 16, "seed": 7}
    other.next_step()  # leaves a prefetched step behind that must be discarded
    other.load_state_dict(state)
    assert ids_of_step(other.next_step()) == ids_of_step(steps[2])
    full.close()


def test_invalid_batch_settings(shards: TokenShards) -> None:
    with pytest.raises(ValueError, match="not divisible"):
        make_loader(shards, global_batch=10, micro_batch=2, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank"):
        make_loader(shards, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="no samples"):
        DistributedLoader(
            TokenShards(str(shards.data_dir), "val"),
            global_batch=2,
            micro_batch=1,
            dp_rank=0,
            dp_size=1,
            seed=0,
        )
