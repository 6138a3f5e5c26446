"""Deterministic, rank-sharded, resumable batches over prepared token shards.

The sample order is a function of (seed, global position) only: position p belongs to epoch
p // N and maps to permutation_e[p % N] with permutation_e = default_rng([seed, e]).permutation(N).
A global step covers positions [consumed, consumed + global_batch); rank r of dp_size takes the
r-th contiguous slice of global_batch / dp_size positions and cuts it into micro batches. So the
union over ranks of a step's samples does not depend on the world size, and resuming needs only
consumed_samples.

Training windows (DistributedLoader(window_offset=...), data.window_offset): "packed" trains on
the stored rows. "random" reads the split as one token stream and shifts every window of epoch
e by one keyed offset o_e = window_shift(seed, e, row_len) in [0, row_len): window k is the
row_len tokens starting at o_e + k * row_len (the tail of row k and the head of row k + 1), for
k in [0, N - 1), N = stored rows. The windows of an epoch are disjoint and cover every token
but the first o_e and the last row_len - o_e, so each token is read at most once per epoch and
exactly once per position, as with packed rows (the same permutation of N - 1 window ids; one
row_len tokens sit out each epoch, at both ends, different ones each epoch). Per-sample independent
offsets would overlap or skip tokens, so the shift is per epoch. A window spanning the end of
one prepare task's rows and the start of the next joins two stretches of text that were not
adjacent (each task drops its packing remainder), like a document boundary without an EOS:
num_tasks - 1 such windows per epoch.

Where the shards are: data_dir is a storage URI (data_pipeline/storage.py). Local paths and
shared mounts are read in place. Object-store shards (s3://, gs://) are downloaded into a
ShardCache, a local directory bounded in bytes with least-recently-used eviction (a shard larger
than the whole bound is read from the store directly, without a local copy); the decoded rows of
the last few shards are kept in memory either way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_pipeline import storage
from data_pipeline.config import DataError
from data_pipeline.manifest import Manifest

Step = list[tuple[torch.Tensor, torch.Tensor]]

CACHE_DIR_ENV = "RAYGPT_SHARD_CACHE"  # where remote shards are kept on this machine
CACHE_BYTES_ENV = "RAYGPT_SHARD_CACHE_BYTES"  # how many bytes of them at most
DEFAULT_CACHE_BYTES = 4 << 30
STALE_TMP_SECONDS = 3600  # a partial download older than this was left by a dead process


class ShardCache:
    """Shard files of remote datasets on local disk: at most max_bytes in all, least recently
    used first out.

    A file is cached under a key that names one version of it (TokenShards uses the dataset's
    fingerprint, its creation time and the file URI), so a re-prepared dataset is never read
    from an old copy. Processes of one machine may share the directory: a copy appears by
    atomic rename, each use stamps its mtime, and making room removes the least recently used
    complete files until the directory's total fits (a file removed while another process has
    it open stays readable to it; one removed just before it is opened is fetched again).
    """

    def __init__(self, directory: Optional[str | Path] = None, max_bytes: Optional[int] = None):
        if directory is None:
            directory = os.environ.get(CACHE_DIR_ENV) or Path(
                tempfile.gettempdir(), f"raygpt-shards-{os.getuid()}"
            )
        if max_bytes is None:
            max_bytes = int(os.environ.get(CACHE_BYTES_ENV) or DEFAULT_CACHE_BYTES)
        if max_bytes < 1:
            raise ValueError(f"ShardCache: max_bytes must be >= 1, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.downloads = 0  # files fetched from storage by this instance
        self._lock = threading.Lock()

    def path_of(self, key: str) -> Path:
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.parquet"

    def fetch(self, uri: str, key: str) -> Optional[Path]:
        """A local copy of `uri` (cached under `key`), or None when the file alone is larger
        than max_bytes (read it from storage then)."""
        path = self.path_of(key)
        with self._lock:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)  # a hit: now the most recently used
                return path
            size = storage.size(uri)
            if size > self.max_bytes:
                return None
            self.directory.mkdir(parents=True, exist_ok=True)
            self._make_room(size)
            tmp = self.directory / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                storage.download(uri, tmp)
                os.utime(tmp)  # a copy of a local file keeps its source's mtime otherwise
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self.downloads += 1
            self._make_room(0, keep=path)  # other processes may have added files meanwhile
            return path

    def read_table(self, uri: str, key: str, columns: list[str]) -> pa.Table:
        """The Parquet file `uri` through the cache (or straight from storage if too big)."""
        for _ in range(3):
            path = self.fetch(uri, key)
            if path is None:
                return _read_parquet(uri, columns)
            try:
                return pq.read_table(path, columns=columns)
            except FileNotFoundError:
                continue  # evicted by another process between fetch and open
        return _read_parquet(uri, columns)

    def cached(self) -> dict[str, int]:
        """File name -> size of the complete files in the cache directory."""
        return {p.name: size for p, size, _ in self._entries()}

    def total_bytes(self) -> int:
        return sum(self.cached().values())

    def _entries(self) -> list[tuple[Path, int, float]]:
        out = []
        try:
            scan = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        now = time.time()
        for entry in scan:
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name.startswith("."):
                if entry.name.endswith(".tmp") and now - st.st_mtime > STALE_TMP_SECONDS:
                    Path(entry.path).unlink(missing_ok=True)
                continue
            out.append((Path(entry.path), st.st_size, st.st_mtime))
        return out

    def _make_room(self, incoming: int, keep: Optional[Path] = None) -> None:
        """Remove least recently used files until they and `incoming` bytes fit max_bytes."""
        entries = sorted(self._entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries) + incoming
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size


@functools.cache
def default_cache() -> ShardCache:
    """This process's cache of remote shards (RAYGPT_SHARD_CACHE, RAYGPT_SHARD_CACHE_BYTES)."""
    return ShardCache()


def _read_parquet(uri: str, columns: list[str]) -> pa.Table:
    fs, path = storage.filesystem(uri)
    try:
        return pq.read_table(path, columns=columns, filesystem=fs)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise storage.StorageError(f"{uri}: cannot read: {storage.one_line(e)}") from None


class TokenShards:
    """Random access to the samples (rows of seq_len + 1 int32 tokens) of one split.

    data_dir: any storage URI. Local paths are read in place; object-store shards go through
    `cache` (default: default_cache()). Passing a cache for a local path stages its shards
    through it too (a slow shared mount onto local disk)."""

    def __init__(
        self,
        data_dir: str,
        split: str,
        *,
        cache_shards: int = 8,
        cache: Optional[ShardCache] = None,
    ):
        self.data_dir = storage.absolute(str(data_dir))
        self.manifest = Manifest.load(self.data_dir)
        if split not in self.manifest.splits:
            raise DataError(
                f"split {split!r} not in {self.data_dir!r} (splits: "
                f"{', '.join(self.manifest.splits)})"
            )
        self.split = split
        self.seq_len = self.manifest.seq_len
        self.row_len = self.seq_len + 1
        if cache is None and storage.is_remote(self.data_dir):
            cache = default_cache()
        self.file_cache = cache
        m = self.manifest
        self._version = f"{m.fingerprint}|{m.created}"
        shards = m.splits[split].shards
        self._files = [storage.join(self.data_dir, s.file) for s in shards]
        self._rows = np.array([s.rows for s in shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._rows)]).astype(np.int64)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = max(1, cache_shards)
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.manifest.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.manifest.tokenizer.eos_id

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, index: int) -> np.ndarray:
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        column = self._read(index).column("tokens")
        rows = _to_rows(column.combine_chunks(), self.row_len, self._files[index])
        if len(rows) != self._rows[index]:
            raise DataError(
                f"shard {str(self._files[index])!r} has {len(rows)} rows, manifest says "
                f"{self._rows[index]}"
            )
        with self._lock:
            self._cache[index] = rows
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return rows

    def _read(self, index: int) -> pa.Table:
        uri = self._files[index]
        if self.file_cache is None:
            return pq.read_table(uri, columns=["tokens"])  # a local path, read in place
        return self.file_cache.read_table(uri, f"{self._version}|{uri}", ["tokens"])

    def __getitem__(self, sample_id: int) -> np.ndarray:
        sample_id = int(sample_id)
        if not 0 <= sample_id < len(self):
            raise IndexError(f"sample {sample_id} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._starts, sample_id, side="right")) - 1
        return self._shard(shard)[sample_id - self._starts[shard]]

    def get_batch(self, ids: np.ndarray) -> np.ndarray:
        """Rows for `ids` (in that order) as an int32 array (len(ids), seq_len + 1); reads each
        needed shard once."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"sample ids out of range [0, {len(self)})")
        out = np.empty((len(ids), self.row_len), dtype=np.int32)
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            out[where] = self._shard(int(shard))[ids[where] - self._starts[shard]]
        return out


def _to_rows(array: pa.Array, row_len: int, path: str) -> np.ndarray:
    if pa.types.is_fixed_size_list(array.type) or pa.types.is_list(array.type):
        values = array.flatten().to_numpy(zero_copy_only=False)
    else:
        raise DataError(f"shard {str(path)!r}: column 'tokens' has type {array.type}, not a list")
    if values.size % row_len or (values.size and len(values) // row_len != len(array)):
        raise DataError(f"shard {str(path)!r}: rows are not all {row_len} tokens long")
    return values.astype(np.int32, copy=False).reshape(-1, row_len)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    perm.flags.writeable = False
    return perm


def sample_ids_at(
    positions: np.ndarray, num_samples: int, seed: int, shuffle: bool = True
) -> np.ndarray:
    """Vectorised `sample_id_at` (identity order modulo num_samples when shuffle=False)."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    positions = np.asarray(positions, dtype=np.int64)
    offsets = positions % num_samples
    if not shuffle:
        return offsets
    epochs = positions // num_samples
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        where = epochs == epoch
        out[where] = _epoch_permutation(num_samples, seed, int(epoch))[offsets[where]]
    return out


def window_shift(seed: int, epoch: int, row_len: int) -> int:
    """The offset in [0, row_len) of every window of `epoch` (window_offset="random")."""
    return int(np.random.default_rng([seed, epoch, 0x57F7]).integers(row_len))


def sample_id_at(position: int, num_samples: int, seed: int) -> int:
    """The sample id at a global position: epoch = position // num_samples, then the seeded
    permutation of that epoch. Independent of the world size."""
    return int(sample_ids_at(np.array([position]), num_samples, seed)[0])


class DistributedLoader:
    """This data-parallel rank's micro batches, one global step at a time.

    global_batch = micro_batch * grad_accum * dp_size (grad_accum is derived). next_step()
    returns grad_accum pairs (inputs, targets) of int64 tensors (micro_batch, seq_len) and
    advances consumed_samples by global_batch. With prefetch, a background thread reads the
    next step's rows while the caller trains; results are identical either way.
    window_offset: "packed" (the stored rows) or "random" (per-epoch shifted windows, see the
    module docstring; needs at least 2 rows).
    """

    def __init__(
        self,
        shards: TokenShards,
        *,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
        shuffle: bool = True,
        prefetch: bool = True,
        window_offset: str = "packed",
    ):
        if micro_batch < 1 or dp_size < 1 or global_batch < 1:
            raise ValueError(
                f"global_batch, micro_batch and dp_size must be >= 1, got {global_batch}, "
                f"{micro_batch}, {dp_size}"
            )
        if global_batch % (micro_batch * dp_size):
            raise ValueError(
                f"global_batch {global_batch} is not divisible by micro_batch * dp_size = "
                f"{micro_batch} * {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if len(shards) == 0:
            raise ValueError(f"split {shards.split!r} of {shards.data_dir!r} has no samples")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if window_offset not in ("packed", "random"):
            raise ValueError(f"window_offset must be 'packed' or 'random', got {window_offset!r}")
        if window_offset == "random" and len(shards) < 2:
            raise ValueError(
                f"window_offset 'random' needs at least 2 rows; split {shards.split!r} of "
                f"{shards.data_dir!r} has {len(shards)}"
            )
        self.window_offset = window_offset
        self.shards = shards
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.grad_accum = global_batch // (micro_batch * dp_size)
        self.seed = seed
        self.shuffle = shuffle
        self._consumed = consumed_samples
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="data-prefetch") if prefetch else None
        self._next: tuple[int, Future[Step]] | None = None

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    @property
    def num_samples(self) -> int:
        """Samples per epoch: the stored rows, or one window fewer with random offsets."""
        return len(self.shards) - (self.window_offset == "random")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def _positions(self, consumed: int) -> np.ndarray:
        per_rank = self.global_batch // self.dp_size
        return consumed + self.dp_rank * per_rank + np.arange(per_rank, dtype=np.int64)

    def sample_ids_for_step(self, consumed: int) -> np.ndarray:
        """This rank's sample ids (window ids with random offsets), in micro-batch order, for
        the step starting at `consumed`."""
        return sample_ids_at(self._positions(consumed), self.num_samples, self.seed, self.shuffle)

    def _read_windows(self, consumed: int) -> np.ndarray:
        """Window k of epoch e: rows k and k + 1 joined, from offset window_shift(e) on."""
        positions = self._positions(consumed)
        ids = sample_ids_at(positions, self.num_samples, self.seed, self.shuffle)
        row_len = self.shards.row_len
        shifts = np.array(
            [window_shift(self.seed, int(e), row_len) for e in positions // self.num_samples],
            dtype=np.int64,
        )
        both = np.concatenate([self.shards.get_batch(ids), self.shards.get_batch(ids + 1)], axis=1)
        take = shifts[:, None] + np.arange(row_len, dtype=np.int64)[None, :]
        return np.take_along_axis(both, take, axis=1)

    def _load_step(self, consumed: int) -> Step:
        if self.window_offset == "random":
            rows = self._read_windows(consumed)
        else:
            rows = self.shards.get_batch(self.sample_ids_for_step(consumed))
        tokens = torch.from_numpy(rows.astype(np.int64)).view(
            self.grad_accum, self.micro_batch, self.shards.row_len
        )
        return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]

    def next_step(self) -> Step:
        """The grad_accum (inputs, targets) micro batches of this rank for the next step."""
        consumed = self._consumed
        if self._next is not None and self._next[0] == consumed:
            step = self._next[1].result()
        else:
            step = self._load_step(consumed)
        self._next = None
        self._consumed = consumed + self.global_batch
        if self._pool is not None:
            following = self._consumed
            self._next = (following, self._pool.submit(self._load_step, following))
        return step

    def __iter__(self) -> Iterator[Step]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict[str, int | str]:
        state: dict[str, int | str] = {"consumed_samples": self._consumed, "seed": self.seed}
        if self.window_offset != "packed":
            state["window_offset"] = self.window_offset
        return state

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        """Restore consumed_samples, seed and window_offset (the checkpoint's order wins; a
        state without them keeps this loader's seed and means packed rows, the only order
        before window_offset existed)."""
        window_offset = str(state.get("window_offset", "packed"))
        if window_offset == "random" and len(self.shards) < 2:
            raise ValueError(
                f"window_offset 'random' needs at least 2 rows, got {len(self.shards)}"
            )
        self.seed = int(state.get("seed", self.seed))
        self.window_offset = window_offset
        self._consumed = int(state["consumed_samples"])
        self._next = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            self._next = None
