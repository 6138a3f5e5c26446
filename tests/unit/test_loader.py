"""TokenShards / DistributedLoader on a small synthetic dataset (tests/synthetic_shards.py; no
Ray, no tokenizer). The same reads from a real S3-compatible server: tests/e2e/test_loader_s3.py."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from synthetic_shards import (
    ROW,
    SEQ_LEN,
    SHARD_ROWS,
    N,
    expected_row,
    ids_of_step,
    make_loader,
    write_dataset,
)

from data_pipeline.config import DataError
from data_pipeline.loader import (
    DistributedLoader,
    ShardCache,
    TokenShards,
    sample_id_at,
    sample_ids_at,
)
from data_pipeline.manifest import Manifest
from data_pipeline.order import BLOCKS, PERMUTATION, Order


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> TokenShards:
    root = write_dataset(tmp_path_factory.mktemp("ds"), SHARD_ROWS, row_group=3)
    return TokenShards(str(root), "train")


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


def test_token_shards_errors(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", SHARD_ROWS)
    assert len(TokenShards(str(root), "val")) == 0
    with pytest.raises(DataError, match="split 'test'"):
        TokenShards(str(root), "test")
    with pytest.raises(DataError, match="no manifest.json in"):
        TokenShards(str(tmp_path / "nothing"), "train")


# ---------------------------------------------------------------------------- row groups
# Shards of SHARD_ROWS rows in row groups of 3: sample i sits in shard k = the shard whose
# first row is <= i, at row r = i - first(k), in row group r // 3.

FIRST = np.concatenate([[0], np.cumsum(SHARD_ROWS)])


def group_of(sample_id: int, rows_per_group: int = 3) -> tuple[int, int]:
    shard = int(np.searchsorted(FIRST, sample_id, side="right")) - 1
    return shard, (sample_id - int(FIRST[shard])) // rows_per_group


def test_only_the_row_groups_needed_are_read_and_each_footer_once(tmp_path: Path) -> None:
    ds = TokenShards(str(write_dataset(tmp_path, SHARD_ROWS, row_group=3)), "train")
    ids = np.array([8, 9, 10, 30, 31, 9])  # shard 1 rows 1-3 (groups 0, 1), shard 4 rows 6-7
    np.testing.assert_array_equal(ds.get_batch(ids), np.stack([expected_row(i) for i in ids]))
    assert sorted(ds._groups.keys()) == sorted({group_of(i) for i in ids}) == [
        (1, 0), (1, 1), (4, 2)
    ]  # fmt: skip
    assert ds._groups.loads == 3 and ds._footers.loads == 2
    every = np.random.default_rng(0).permutation(N)
    for part in np.array_split(every, 5):
        np.testing.assert_array_equal(ds.get_batch(part), np.stack([expected_row(i) for i in part]))
    assert ds._footers.loads == len(SHARD_ROWS)  # one footer read per file
    assert ds._groups.loads == len({group_of(i) for i in range(N)})  # each group read once
    ds.close()


def test_decoded_row_groups_stay_under_their_byte_bound(tmp_path: Path) -> None:
    group_bytes = 3 * ROW * 4  # int32 rows
    bound = 2 * group_bytes
    ds = TokenShards(
        str(write_dataset(tmp_path, SHARD_ROWS, row_group=3)), "train", cache_bytes=bound
    )
    for i in range(N):
        np.testing.assert_array_equal(ds[i], expected_row(i))
        assert ds._groups.bytes <= bound
    loads = ds._groups.loads
    ds[N - 1]  # the most recent group: still held
    assert ds._groups.loads == loads
    ds[0]  # evicted long ago: read again
    assert ds._groups.loads == loads + 1
    small = TokenShards(str(tmp_path), "train", cache_shards=1)  # a count bound as well
    for i in (0, 3, 0):
        small[i]
    assert len(small._groups.keys()) == 1 and small._groups.loads == 3


def test_a_damaged_row_group_is_one_line_naming_the_shard_and_group(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, [30], row_group=10)
    path = root / "train-00000-000.parquet"
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start + 20, start + column.total_compressed_size - 4, 3):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    ds = TokenShards(str(root), "train")
    np.testing.assert_array_equal(ds.get_batch(np.arange(10)), np.stack(
        [expected_row(i) for i in range(10)]
    ))  # fmt: skip
    with pytest.raises(DataError) as err:
        ds[15]
    assert "\n" not in str(err.value) and f"shard {str(path)!r}: row group 1 unreadable" in str(
        err.value
    )


def test_a_shard_with_other_rows_than_the_manifest_says(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, [4, 6])
    d = Manifest.load(root).to_dict()
    d["splits"]["train"]["shards"][1]["rows"] = 5
    Manifest.from_dict(d).save(root)
    ds = TokenShards(str(root), "train")
    np.testing.assert_array_equal(ds[3], expected_row(3))
    with pytest.raises(DataError, match=r"train-00000-001.parquet' has 6 rows, manifest says 5"):
        ds[4]


def test_prefetch_reads_the_row_groups_of_the_next_steps(tmp_path: Path) -> None:
    ds = TokenShards(str(write_dataset(tmp_path, SHARD_ROWS, row_group=3)), "train")
    order = Order(BLOCKS, chunk=4, window=2)
    loader = make_loader(ds, global_batch=4, micro_batch=2, order=order, prefetch_steps=2)
    loader.next_step()
    wanted = {group_of(int(i)) for k in (1, 2, 3) for i in loader.sample_ids_for_step(4 * k)}
    deadline = time.time() + 30
    while not wanted <= set(ds._groups.keys()) and time.time() < deadline:
        time.sleep(0.01)
    assert wanted <= set(ds._groups.keys())  # read before they were asked for
    loads = ds._groups.loads
    for k in (1, 2):
        assert ids_of_step(loader.next_step()) == loader.sample_ids_for_step(4 * k).tolist()
    assert (
        all(group_of(int(i)) in ds._groups.keys() for i in loader.sample_ids_for_step(12))
        and ds._groups.loads >= loads
    )
    loader.close()
    ds.close()


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


def test_the_legacy_order_is_the_seeded_permutation_per_epoch() -> None:
    legacy = Order(PERMUTATION)
    epoch0 = [sample_id_at(p, N, seed=3, order=legacy) for p in range(N)]
    epoch1 = [sample_id_at(p, N, seed=3, order=legacy) for p in range(N, 2 * N)]
    assert sorted(epoch0) == list(range(N)) and sorted(epoch1) == list(range(N))
    assert epoch0 != epoch1 and epoch0 != list(range(N))
    np.testing.assert_array_equal(np.random.default_rng([3, 1]).permutation(N), epoch1)
    positions = np.arange(5, 3 * N, 7)
    assert sample_ids_at(positions, N, 3, order=legacy).tolist() == [
        sample_id_at(p, N, 3, order=legacy) for p in positions
    ]
    assert sample_ids_at(positions, N, 3, shuffle=False).tolist() == (positions % N).tolist()


def test_new_loaders_use_the_blocks_order(shards: TokenShards) -> None:
    order = Order(BLOCKS, chunk=4, window=2)
    loader = make_loader(shards, order=order)
    epoch = [i for k in range(N // 8) for i in loader.sample_ids_for_step(8 * k)]
    assert sorted(epoch) == list(range(N)) and epoch != list(range(N))
    # windows of 2 chunks of 4: positions 8k..8k+7 hold the samples of 2 chunks only
    for k in range(N // 8):
        assert len({i // 4 for i in epoch[8 * k : 8 * k + 8]}) == 2
    assert make_loader(shards).order == Order()  # blocks-v1, chunk 1024, window 16
    assert epoch != [sample_id_at(p, N, 7, order=Order(PERMUTATION)) for p in range(N)]


ORDERS = [Order(), Order(BLOCKS, chunk=4, window=2), Order(BLOCKS, chunk=3, window=1),
          Order(PERMUTATION)]  # fmt: skip


@pytest.mark.parametrize("order", ORDERS, ids=str)
@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_epoch_reads_every_sample_once(shards: TokenShards, dp_size: int, order: Order) -> None:
    loaders = [make_loader(shards, dp_rank=r, dp_size=dp_size, order=order) for r in range(dp_size)]
    seen: Counter[int] = Counter()
    for _ in range(N // 8):
        for loader in loaders:
            step = loader.next_step()
            assert len(step) == 8 // (2 * dp_size)  # grad_accum
            seen.update(ids_of_step(step))
    assert seen == Counter(range(N))
    assert all(loader.consumed_samples == N for loader in loaders)


@pytest.mark.parametrize("order", ORDERS, ids=str)
def test_union_of_ranks_equals_single_rank_order(shards: TokenShards, order: Order) -> None:
    args = dict(global_batch=12, micro_batch=3, order=order)
    single = make_loader(shards, **args)
    pair = [make_loader(shards, dp_rank=r, dp_size=2, **args) for r in (0, 1)]
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
        assert resumed.order == full.order == Order()
        for expected in steps[k:]:
            got = resumed.next_step()
            for (x, y), (ex, ey) in zip(got, expected):
                assert torch.equal(x, ex) and torch.equal(y, ey)
    # state_dict round trip restores position and seed
    other = make_loader(shards, dp_rank=1, dp_size=2, seed=99)
    state = make_loader(shards, dp_rank=1, dp_size=2, consumed_samples=16).state_dict()
    assert state == {
        "consumed_samples": 16, "seed": 7, "order": "blocks-v1", "order_chunk": 1024,
        "order_window": 16,
    }  # fmt: skip
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


@pytest.mark.parametrize("saved_dp,resumed_dp", [(1, 2), (2, 4), (4, 1)])
def test_resume_at_another_dp_size_keeps_the_checkpoint_order(
    shards: TokenShards, saved_dp: int, resumed_dp: int
) -> None:
    """A state with an order resumes in it whatever the new loader was built with; a state
    without one (every checkpoint before blocks-v1) resumes in the permutation order."""
    recorded = Order(BLOCKS, chunk=4, window=3)
    for order, state_keys in ((recorded, recorded.state()), (Order(PERMUTATION), {})):
        whole = [
            sample_id_at(p, N, 7, order=order) for p in range(40)
        ]  # 5 steps of 8: crosses the epoch boundary at 32
        saved = make_loader(shards, dp_size=saved_dp, order=order, consumed_samples=16)
        state = saved.state_dict()
        assert {k: state[k] for k in state_keys} == state_keys and ("order" in state) == bool(
            state_keys
        )
        ranks = [make_loader(shards, dp_rank=r, dp_size=resumed_dp) for r in range(resumed_dp)]
        for loader in ranks:
            loader.load_state_dict(state)
            assert loader.order == order
        for step in range(2, 5):
            got = [i for loader in ranks for i in ids_of_step(loader.next_step())]
            assert got == whole[8 * step : 8 * step + 8]
        for loader in ranks:
            loader.close()
    legacy = make_loader(shards)
    legacy.load_state_dict({"consumed_samples": 8})  # a pre-parts checkpoint's loader state
    assert legacy.order == Order(PERMUTATION) and legacy.state_dict() == {
        "consumed_samples": 8, "seed": 7
    }  # fmt: skip
    assert (
        ids_of_step(legacy.next_step())
        == np.random.default_rng([7, 0]).permutation(N)[8:16].tolist()
    )


@pytest.mark.parametrize("order", ORDERS[1:], ids=str)
def test_random_window_offsets_in_every_order(shards: TokenShards, order: Order) -> None:
    """window_offset="random" reads rows ids and ids + 1: each window once per epoch (N - 1
    windows), the same windows at any DP size."""
    args = dict(global_batch=4, micro_batch=1, window_offset="random", order=order)
    single = make_loader(shards, **args)
    assert single.num_samples == N - 1
    steps = [single.next_step() for _ in range(2 * 31 // 4)]
    starts = [int(x[0, 0]) for step in steps for x, _ in step]  # first input token of a window
    for epoch in range(2):
        first = starts[epoch * (N - 1) : (epoch + 1) * (N - 1)]
        if len(first) == N - 1:
            ids = sorted(s // 100 for s in first)  # the row each window starts in
            assert ids == list(range(N - 1))
    for dp_size in (2, 4):
        ranks = [make_loader(shards, dp_rank=r, dp_size=dp_size, **args) for r in range(dp_size)]
        for k, step in enumerate(steps[:6]):
            got = sorted(int(x[0, 0]) for r in ranks for x, _ in r.next_step())
            assert got == sorted(int(x[0, 0]) for x, _ in step), (dp_size, k)


# ------------------------------------------------------------- steps placed on the device


def test_a_cpu_engine_gets_the_host_steps_unchanged(shards: TokenShards, monkeypatch) -> None:
    def no_pinning(self, *args, **kwargs):
        raise AssertionError("pin_memory() for a device that is not CUDA")

    plain = make_loader(shards)
    want = plain.next_step()
    plain.close()
    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)
    loader = make_loader(shards)
    loader.place_on(torch.device("cpu"))
    got = loader.next_step()
    assert all(torch.equal(a, b) for pa_, pb in zip(got, want) for a, b in zip(pa_, pb))
    assert all(t.device.type == "cpu" for pair in got for t in pair)
    loader.close()


class _FakeCuda:
    """torch.cuda's streams and events where there is no GPU: records who waited on what."""

    def __init__(self) -> None:
        self.waited: list[object] = []

    def Stream(self, device):  # noqa: N802 - torch.cuda.Stream's name
        return "loader-stream"

    def stream(self, stream):
        import contextlib

        return contextlib.nullcontext()

    def Event(self):  # noqa: N802 - torch.cuda.Event's name
        return type("E", (), {"record": lambda self, stream=None: None})()

    def current_stream(self, device=None):
        fake = self
        return type("S", (), {"wait_event": lambda self, e: fake.waited.append(e)})()


def test_on_cuda_the_prefetch_thread_pins_and_copies_and_the_training_thread_does_not(
    shards: TokenShards, monkeypatch
) -> None:
    """Without a GPU: the CUDA calls are faked and the "device" copy lands on the meta device,
    so what is checked is which thread pins and copies, and that the steps arrive copied."""
    import threading

    fake, where = _FakeCuda(), []
    for name in ("Stream", "stream", "Event", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    real_to = torch.Tensor.to

    def pin(self):
        where.append(("pin", threading.current_thread().name))
        return self

    def to(self, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if isinstance(device, torch.device) and device.type == "cuda":
            where.append(("copy", threading.current_thread().name, kwargs.get("non_blocking")))
            return real_to(self, "meta")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    loader = make_loader(shards, global_batch=4, micro_batch=2)
    loader.place_on(torch.device("cuda", 0))
    for _ in range(3):
        step = loader.next_step()
        assert len(step) == 2 and all(t.device.type == "meta" for pair in step for t in pair)
    loader.close()
    assert len(fake.waited) == 3  # the training thread's stream waited for each step's copy
    threads = {w[1] for w in where}
    assert threads and all(name.startswith("data-prefetch") for name in threads), where
    assert all(w[2] is True for w in where if w[0] == "copy")
    assert sum(w[0] == "copy" for w in where) >= 3 * 2 * 2  # the steps taken, and one ahead
