"""Deterministic, rank-sharded, resumable batches over prepared token shards, read by row group.

The order: position p (the global count of consumed samples) maps to a sample id through a
keyed function of (seed, p) in data_pipeline/order.py, computed per position in O(batch) memory.
New runs use "blocks-v1": chunks of data.order_chunk consecutive samples in a keyed order per
epoch, shuffled within windows of data.order_window chunks, so a step's samples come from a
bounded number of chunks (row groups). The loader's checkpointed state names the order
({"order": "blocks-v1", "order_chunk": C, "order_window": W}); a state without "order" (every
checkpoint written before blocks-v1) resumes in the old materialised "permutation" order, so
those runs continue exactly. A global step covers positions [consumed, consumed + global_batch);
rank r of dp_size takes the r-th contiguous slice of global_batch / dp_size positions and cuts it
into micro batches. So the union over ranks of a step's samples does not depend on the world
size, and resuming needs only consumed_samples (and the recorded order).

Training windows (DistributedLoader(window_offset=...), data.window_offset): "packed" trains on
the stored rows. "random" reads the split as one token stream and shifts every window of epoch
e by one keyed offset o_e = window_shift(seed, e, row_len) in [0, row_len): window k is the
row_len tokens starting at o_e + k * row_len (the tail of row k and the head of row k + 1), for
k in [0, N - 1), N = stored rows. The windows of an epoch are disjoint and cover every token
but the first o_e and the last row_len - o_e, so each token is read at most once per epoch and
exactly once per position, as with packed rows (the same order of N - 1 window ids; one
row_len tokens sit out each epoch, at both ends, different ones each epoch). Per-sample independent
offsets would overlap or skip tokens, so the shift is per epoch. A window spanning the end of
one prepare task's rows and the start of the next joins two stretches of text that were not
adjacent (each task drops its packing remainder), like a document boundary without an EOS:
num_tasks - 1 such windows per epoch.

Reads: a sample id maps to (shard, row group, row) through the manifest's row counts and each
shard's Parquet footer, read once per file and kept (FileMetaData, bounded by count). Only the
needed row groups are read (ParquetFile.read_row_group) and decoded into an LRU bounded in bytes
(data.read_cache_mb). Reads run on a small thread pool (data.read_threads), one read per row
group in flight; since the order is known ahead, the loader asks for the row groups of the next
data.prefetch_steps steps while the current one trains.

Where the shards are: data_dir is a storage URI (data_pipeline/storage.py). Local paths and
shared mounts are read in place. Object-store shards (s3://, gs://) are read by ranged requests
through pyarrow's filesystem: one footer read per file, then one request per row group, with the
open file handles (their size known: no new HEAD per read) and the decoded row groups kept in
bounded caches. This reads only the row groups a window needs (a whole-file copy would fetch the
other row groups of each file too: with blocks-v1 a window's chunks are spread over the corpus)
and the prefetch pool hides the per-request latency. Passing a ShardCache (a local directory
bounded in bytes with least-recently-used eviction) stages whole files through it instead, e.g.
a slow shared mount onto local disk; a file larger than its whole bound is read in place.
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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_pipeline import storage
from data_pipeline.config import DataError
from data_pipeline.manifest import Manifest
from data_pipeline.order import BLOCKS, Order

Step = list[tuple[torch.Tensor, torch.Tensor]]
_Placed = tuple[Step, Optional["torch.cuda.Event"]]  # a step and its device copy's event

CACHE_DIR_ENV = "RAYGPT_SHARD_CACHE"  # where remote shards are kept on this machine
CACHE_BYTES_ENV = "RAYGPT_SHARD_CACHE_BYTES"  # how many bytes of them at most
DEFAULT_CACHE_BYTES = 4 << 30
STALE_TMP_SECONDS = 3600  # a partial download older than this was left by a dead process
DEFAULT_READ_CACHE_BYTES = 1 << 30  # decoded row groups kept in memory (data.read_cache_mb)
DEFAULT_READ_THREADS = 8  # row-group reads in flight (data.read_threads)
FOOTERS_KEPT = 4096  # FileMetaData of this many shards (a few KB each)
HANDLES_KEPT = 256  # open remote files (each holds its size: no HEAD per read)
DEFAULT_ORDER = Order()


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
        return storage.retrying(
            "read", uri, lambda: pq.read_table(path, columns=columns, filesystem=fs)
        )
    except (FileNotFoundError, storage.StorageError):
        raise
    except OSError as e:
        raise storage.StorageError(f"{uri}: cannot read: {storage.one_line(e)}") from None


class LoadCache:
    """Values by key, least recently used first out once over max_bytes (or max_items), each
    loaded at most once at a time: get() returns a Future, done for a hit, the load in flight
    for a key already asked for, else a new load on `pool`. A load must not wait on this pool."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        *,
        max_bytes: Optional[int] = None,
        max_items: Optional[int] = None,
        size_of: Callable[[Any], int] = lambda _: 0,
    ):
        self.pool, self.size_of = pool, size_of
        self.max_bytes, self.max_items = max_bytes, max_items
        self.loads = 0  # values loaded (misses)
        self._values: OrderedDict[Any, Any] = OrderedDict()
        self._sizes: dict[Any, int] = {}
        self._pending: dict[Any, Future] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any, load: Callable[[], Any]) -> Future:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                done: Future = Future()
                done.set_result(self._values[key])
                return done
            if key not in self._pending:
                self._pending[key] = self.pool.submit(self._load, key, load)
            return self._pending[key]

    def _load(self, key: Any, load: Callable[[], Any]) -> Any:
        try:
            value = load()
            with self._lock:
                self.loads += 1
                self._put(key, value)
            return value
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def _put(self, key: Any, value: Any) -> None:
        size = self.size_of(value)
        self._values[key], self._sizes[key] = value, size
        self._bytes += size
        while len(self._values) > 1 and (
            (self.max_bytes is not None and self._bytes > self.max_bytes)
            or (self.max_items is not None and len(self._values) > self.max_items)
        ):
            old, _ = self._values.popitem(last=False)
            self._bytes -= self._sizes.pop(old)

    def keys(self) -> list[Any]:
        with self._lock:
            return list(self._values)

    @property
    def bytes(self) -> int:
        return self._bytes


class TokenShards:
    """Random access to the samples (rows of seq_len + 1 int32 tokens) of one split, read row
    group by row group (see the module docstring).

    data_dir: any storage URI. Local paths are read in place, object stores by ranged reads;
    passing `cache` (a ShardCache) stages whole files through it instead. cache_bytes bounds the
    decoded row groups kept in memory; cache_shards, if given, also bounds their number (the
    shards of datasets prepared before row groups were written have one row group each).
    read_threads: row-group reads in flight."""

    def __init__(
        self,
        data_dir: str,
        split: str,
        *,
        cache_bytes: int = DEFAULT_READ_CACHE_BYTES,
        cache_shards: Optional[int] = None,
        cache: Optional[ShardCache] = None,
        read_threads: int = DEFAULT_READ_THREADS,
    ):
        if cache_bytes < 1 or read_threads < 1:
            raise ValueError(
                f"cache_bytes and read_threads must be >= 1, got {cache_bytes}, {read_threads}"
            )
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
        self.file_cache = cache  # None: in place (local) or ranged reads (object stores)
        shards = self.manifest.splits[split].shards
        self._names = shards.files  # URIs joined on use: a corpus has 1e5+ shards
        self._rows = shards.rows
        self._starts = np.concatenate([[0], np.cumsum(self._rows)]).astype(np.int64)
        self._pool = ThreadPoolExecutor(read_threads, thread_name_prefix="row-groups")
        self._planner = ThreadPoolExecutor(1, thread_name_prefix="row-group-plan")
        self._footers = LoadCache(self._pool, max_items=FOOTERS_KEPT)
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._handles_lock = threading.Lock()
        self._groups = LoadCache(
            self._pool, max_bytes=cache_bytes, max_items=cache_shards, size_of=lambda a: a.nbytes
        )

    @functools.cached_property
    def _version(self) -> str:
        """What names this version of the dataset in a ShardCache (computed on first use: a
        digest of a large manifest takes a while)."""
        m = self.manifest
        return getattr(m, "cache_key", None) or f"{m.fingerprint}|{m.created}"

    @property
    def vocab_size(self) -> int:
        return self.manifest.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.manifest.tokenizer.eos_id

    def __len__(self) -> int:
        return int(self._starts[-1])

    # -- files and footers -----------------------------------------------------------------
    def _uri(self, index: int) -> str:
        return storage.join(self.data_dir, self._names[index])

    def _source(self, index: int) -> Any:
        """What pq.ParquetFile opens for shard `index`: a local path, an open ShardCache copy, or
        a kept handle of the remote file."""
        uri = self._uri(index)
        cached = self._open_cached(uri) if self.file_cache is not None else None
        if cached is not None:
            return cached
        if not storage.is_remote(uri):
            return uri
        with self._handles_lock:
            if index in self._handles:
                self._handles.move_to_end(index)
                return self._handles[index]
        fs, path = storage.filesystem(uri)
        handle = storage._call("read", uri, fs.open_input_file, path)
        with self._handles_lock:
            self._handles[index] = handle
            while len(self._handles) > HANDLES_KEPT:
                self._handles.popitem(last=False)
        return handle

    def _open_cached(self, uri: str) -> Optional[pa.OSFile]:
        """The ShardCache copy of `uri`, opened at once: a copy evicted after this (another
        thread's or process's fetch making room) stays readable through the handle; one evicted
        between fetch and open is fetched again. None: the file is too big for the cache."""
        for _ in range(3):
            path = self.file_cache.fetch(uri, f"{self._version}|{uri}")
            if path is None:
                return None
            try:
                return pa.OSFile(str(path))
            except FileNotFoundError:
                continue
        return None

    def _read_footer(self, index: int) -> tuple[pq.FileMetaData, np.ndarray]:
        """Shard `index`'s footer and its row groups' first rows (+ the end)."""
        uri = self._uri(index)
        try:  # a throttled or reset read is tried again, never named corruption
            meta = storage.retrying(
                "read the footer of", uri, lambda: pq.read_metadata(self._source(index))
            )
        except (FileNotFoundError, storage.StorageError):
            raise
        except (OSError, pa.ArrowException) as e:
            raise DataError(
                f"shard {uri!r}: not a readable Parquet file ({storage.one_line(e)})"
            ) from None
        if meta.num_rows != self._rows[index]:
            raise DataError(
                f"shard {uri!r} has {meta.num_rows} rows, manifest says {self._rows[index]}"
            )
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        return meta, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def _footer(self, index: int) -> Future:
        return self._footers.get(index, lambda: self._read_footer(index))

    # -- row groups -------------------------------------------------------------------------
    def _read_group(self, index: int, group: int, meta: pq.FileMetaData) -> np.ndarray:
        uri = self._uri(index)
        try:
            table = storage.retrying(
                f"read row group {group} of",
                uri,
                lambda: pq.ParquetFile(self._source(index), metadata=meta).read_row_group(
                    group, columns=["tokens"]
                ),
            )
        except (FileNotFoundError, storage.StorageError):
            raise
        except (OSError, pa.ArrowException) as e:
            raise DataError(
                f"shard {uri!r}: row group {group} unreadable ({storage.one_line(e)})"
            ) from None
        rows = _to_rows(table.column("tokens").combine_chunks(), self.row_len, uri)
        if len(rows) != meta.row_group(group).num_rows:
            raise DataError(f"shard {uri!r}: row group {group} decodes to {len(rows)} rows")
        rows.flags.writeable = False
        return rows

    def _group(self, index: int, group: int, meta: pq.FileMetaData) -> Future:
        return self._groups.get((index, group), lambda: self._read_group(index, group, meta))

    def _plan(self, ids: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """shard -> (positions in ids, rows in the shard) for the shards `ids` touch."""
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        shards, first = np.unique(shard_of[order], return_index=True)
        plan = {}
        for shard, where in zip(shards.tolist(), np.split(order, first[1:])):
            plan[shard] = (where, ids[where] - self._starts[shard])
        return plan

    def _request(self, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, Future]]:
        """Start every read `ids` need: (positions, rows in the group, ..., future rows) per
        row group; waits for footers only (footer loads never wait on this pool)."""
        plan = self._plan(ids)
        footers = {shard: self._footer(shard) for shard in plan}
        requests = []
        for shard, (where, rows) in plan.items():
            meta, starts = footers[shard].result()
            group_of = np.searchsorted(starts, rows, side="right") - 1
            for group in np.unique(group_of).tolist():
                pick = group_of == group
                fut = self._group(shard, group, meta)
                requests.append((where[pick], rows[pick] - starts[group], pick, fut))
        return requests

    def prefetch(self, ids: Iterable[int]) -> None:
        """Start reading the row groups of `ids` in the background (returns at once)."""
        ids = self._checked(ids)
        if ids.size:
            self._planner.submit(self._request, ids)

    def _checked(self, ids: Iterable[int]) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"sample ids out of range [0, {len(self)})")
        return ids

    def __getitem__(self, sample_id: int) -> np.ndarray:
        sample_id = int(sample_id)
        if not 0 <= sample_id < len(self):
            raise IndexError(f"sample {sample_id} out of range [0, {len(self)})")
        return self.get_batch(np.array([sample_id]))[0]

    def get_batch(self, ids: np.ndarray) -> np.ndarray:
        """Rows for `ids` (in that order) as an int32 array (len(ids), seq_len + 1); reads each
        needed row group once, all of them in parallel."""
        ids = self._checked(ids)
        out = np.empty((len(ids), self.row_len), dtype=np.int32)
        for where, rows, _, fut in self._request(ids):
            out[where] = fut.result()[rows]
        return out

    def close(self) -> None:
        """Stop the read threads (pending reads finish first)."""
        self._planner.shutdown(wait=True)
        self._pool.shutdown(wait=True)


def _to_rows(array: pa.Array, row_len: int, path: str) -> np.ndarray:
    if pa.types.is_fixed_size_list(array.type) or pa.types.is_list(array.type):
        values = array.flatten().to_numpy(zero_copy_only=False)
    else:
        raise DataError(f"shard {str(path)!r}: column 'tokens' has type {array.type}, not a list")
    if values.size % row_len or (values.size and len(values) // row_len != len(array)):
        raise DataError(f"shard {str(path)!r}: rows are not all {row_len} tokens long")
    return values.astype(np.int32, copy=False).reshape(-1, row_len)


def sample_ids_at(
    positions: np.ndarray,
    num_samples: int,
    seed: int,
    shuffle: bool = True,
    order: Order = DEFAULT_ORDER,
) -> np.ndarray:
    """Sample ids at global positions in `order` (default blocks-v1, data_pipeline/order.py;
    identity modulo num_samples when shuffle=False)."""
    return order.sample_ids(positions, num_samples, seed, shuffle)


def window_shift(seed: int, epoch: int, row_len: int) -> int:
    """The offset in [0, row_len) of every window of `epoch` (window_offset="random")."""
    return int(np.random.default_rng([seed, epoch, 0x57F7]).integers(row_len))


def sample_id_at(position: int, num_samples: int, seed: int, order: Order = DEFAULT_ORDER) -> int:
    """The sample id at a global position (epoch = position // num_samples). Independent of
    the world size."""
    return int(sample_ids_at(np.array([position]), num_samples, seed, order=order)[0])


class StepLoader:
    """What DistributedLoader and MixtureLoader share: a global step covers the positions
    [consumed, consumed + global_batch); this data-parallel rank takes the dp_rank-th slice of
    global_batch / dp_size positions, in grad_accum micro batches of micro_batch rows. With
    prefetch, a background thread assembles the next step while the caller trains and the row
    groups of the prefetch_steps steps after it are asked for ahead. Subclasses say how a step
    is read (_load_step) and which rows a step will read (_prefetch_step). place_on(cuda
    device): that thread also pins the step and copies it to the device, so the caller gets
    device tensors and copies nothing."""

    def __init__(
        self,
        *,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int,
        prefetch: bool,
        seq_rank: int = 0,
        seq_size: int = 1,
        prefetch_steps: int,
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
        if not 0 <= seq_rank < seq_size:
            raise ValueError(f"seq_rank {seq_rank} not in [0, {seq_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if prefetch_steps < 0:
            raise ValueError(f"prefetch_steps must be >= 0, got {prefetch_steps}")
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.grad_accum = global_batch // (micro_batch * dp_size)
        self.seq_rank, self.seq_size = seq_rank, seq_size
        self.prefetch_steps = prefetch_steps if prefetch else 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="data-prefetch") if prefetch else None
        self.device: Optional[torch.device] = None  # CUDA: steps come there (place_on)
        self._stream: Optional[torch.cuda.Stream] = None
        self._restart_at(consumed_samples)

    def place_on(self, device: torch.device) -> None:
        """Steps come on `device` from now on. A CUDA device: each step is pinned and copied
        non-blocking on a stream of the loader's, in the prefetch thread (in next_step without
        prefetch); the caller's stream waits for the copy's event, the host never does.
        Any other device: nothing changes (host tensors, which a CPU engine uses as they are)."""
        if device.type != "cuda":
            self.device, self._stream = None, None
            return
        self.device, self._stream = device, torch.cuda.Stream(device)
        self._restart_at(self._consumed)  # a step assembled for the host is assembled again

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    def _restart_at(self, consumed: int) -> None:
        self._consumed = consumed
        self._ahead = consumed  # row groups asked for up to the step starting here
        self._next: tuple[int, Future[_Placed]] | None = None
        if self._pool is not None and self.device is not None:  # the first step, off-thread too
            self._next = (consumed, self._pool.submit(self._placed_step, consumed))

    def _positions(self, consumed: int) -> np.ndarray:
        per_rank = self.global_batch // self.dp_size
        return consumed + self.dp_rank * per_rank + np.arange(per_rank, dtype=np.int64)

    def _micro_batches(self, rows: np.ndarray) -> Step:
        """This rank's rows (global_batch / dp_size, seq_len + 1) as grad_accum (inputs,
        targets) pairs of int64 tensors (micro_batch, seq_len); with sequence parallelism
        (seq_size > 1) slice seq_rank of seq_size equal slices of both (micro_batch,
        seq_len / seq_size): the ranks of a sequence group read the same samples."""
        tokens = torch.from_numpy(rows.astype(np.int64)).view(
            self.grad_accum, self.micro_batch, rows.shape[-1]
        )
        cut = (rows.shape[-1] - 1) // self.seq_size
        part = slice(self.seq_rank * cut, (self.seq_rank + 1) * cut)
        return [(t[:, :-1][:, part].contiguous(), t[:, 1:][:, part].contiguous()) for t in tokens]

    def _load_step(self, consumed: int) -> Step:
        raise NotImplementedError

    def _prefetch_step(self, consumed: int) -> None:
        """Ask for the row groups the step starting at `consumed` will read."""
        raise NotImplementedError

    def _placed_step(self, consumed: int) -> _Placed:
        """The step at `consumed`, on self.device (with the event its copy ends with)."""
        step = self._load_step(consumed)
        if self.device is None:
            return step, None
        with torch.cuda.stream(self._stream):
            step = [
                (x.pin_memory().to(self.device, non_blocking=True),
                 y.pin_memory().to(self.device, non_blocking=True))
                for x, y in step
            ]  # fmt: skip
            copied = torch.cuda.Event()
            copied.record(self._stream)
        return step, copied

    def next_step(self) -> Step:
        """The grad_accum (inputs, targets) micro batches of this rank for the next step."""
        consumed = self._consumed
        if self._next is not None and self._next[0] == consumed:
            step, copied = self._next[1].result()
        else:
            step, copied = self._placed_step(consumed)
        if copied is not None:  # the caller's stream waits for the copy; the host does not
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copied)
            for t in (t for pair in step for t in pair):
                t.record_stream(stream)  # made on the loader's stream, used on this one
        self._next = None
        self._consumed = consumed + self.global_batch
        if self._pool is not None:
            following = self._consumed
            self._read_ahead(following)
            self._next = (following, self._pool.submit(self._placed_step, following))
        return step

    def _read_ahead(self, following: int) -> None:
        """Ask for the row groups of the prefetch_steps steps after the one at `following`
        (each step once: only those not asked for by an earlier call; afresh after a jump)."""
        last = following + self.prefetch_steps * self.global_batch
        start = max(self._ahead, following) + self.global_batch
        if not following <= self._ahead <= last:  # a jump (load_state_dict): start afresh
            start = following + self.global_batch
        for consumed in range(start, last + 1, self.global_batch):
            self._prefetch_step(consumed)
        self._ahead = max(last, following)

    def __iter__(self) -> Iterator[Step]:
        while True:
            yield self.next_step()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            self._next = None


class DistributedLoader(StepLoader):
    """This data-parallel rank's micro batches, one global step at a time.

    global_batch = micro_batch * grad_accum * dp_size (grad_accum is derived). next_step()
    returns grad_accum pairs (inputs, targets) of int64 tensors (micro_batch, seq_len) and
    advances consumed_samples by global_batch. With prefetch, a background thread assembles the
    next step while the caller trains and the row groups of the next prefetch_steps steps are
    read ahead; results are identical either way.
    order: the data order of a new run (data_pipeline/order.py; a checkpointed state's order
    wins on load_state_dict).
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
        seq_rank: int = 0,
        seq_size: int = 1,
        consumed_samples: int = 0,
        shuffle: bool = True,
        prefetch: bool = True,
        window_offset: str = "packed",
        order: Order = DEFAULT_ORDER,
        prefetch_steps: int = 16,
    ):
        if len(shards) == 0:
            raise ValueError(f"split {shards.split!r} of {shards.data_dir!r} has no samples")
        _check_window_offset(window_offset, shards)
        super().__init__(
            global_batch=global_batch,
            micro_batch=micro_batch,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seq_rank=seq_rank,
            seq_size=seq_size,
            consumed_samples=consumed_samples,
            prefetch=prefetch,
            prefetch_steps=prefetch_steps,
        )
        self.window_offset = window_offset
        self.order = order
        self.shards = shards
        self.seed = seed
        self.shuffle = shuffle

    @property
    def num_samples(self) -> int:
        """Samples per epoch: the stored rows, or one window fewer with random offsets."""
        return len(self.shards) - (self.window_offset == "random")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def sample_ids_for_step(self, consumed: int) -> np.ndarray:
        """This rank's sample ids (window ids with random offsets), in micro-batch order, for
        the step starting at `consumed`."""
        return sample_ids_at(
            self._positions(consumed), self.num_samples, self.seed, self.shuffle, self.order
        )

    def _rows_for_step(self, consumed: int) -> np.ndarray:
        """The stored rows the step starting at `consumed` reads (ids and ids + 1 for random
        window offsets)."""
        ids = self.sample_ids_for_step(consumed)
        return np.concatenate([ids, ids + 1]) if self.window_offset == "random" else ids

    def _read_windows(self, consumed: int) -> np.ndarray:
        """Window k of epoch e: rows k and k + 1 joined, from offset window_shift(e) on."""
        positions = self._positions(consumed)
        ids = self.sample_ids_for_step(consumed)
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
        return self._micro_batches(rows)

    def _prefetch_step(self, consumed: int) -> None:
        self.shards.prefetch(self._rows_for_step(consumed))

    def state_dict(self) -> dict[str, int | str]:
        state: dict[str, int | str] = {"consumed_samples": self._consumed, "seed": self.seed}
        if self.window_offset != "packed":
            state["window_offset"] = self.window_offset
        state.update(self.order.state())
        return state

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        """Restore consumed_samples, seed, window_offset and the order (the checkpoint's order
        wins; a state without them keeps this loader's seed and means packed rows in the
        "permutation" order, the only order before window_offset and blocks-v1 existed)."""
        window_offset = str(state.get("window_offset", "packed"))
        _check_window_offset(window_offset, self.shards)
        self.order = Order.from_state(state)
        self.seed = int(state.get("seed", self.seed))
        self.window_offset = window_offset
        self._restart_at(int(state["consumed_samples"]))


def _check_window_offset(window_offset: str, shards: TokenShards) -> None:
    if window_offset not in ("packed", "random"):
        raise ValueError(f"window_offset must be 'packed' or 'random', got {window_offset!r}")
    if window_offset == "random" and len(shards) < 2:
        raise ValueError(
            f"window_offset 'random' needs at least 2 rows; split {shards.split!r} of "
            f"{shards.data_dir!r} has {len(shards)}"
        )


def shard_settings(data: Any) -> dict[str, int]:
    """TokenShards' read settings from a DataConfig (read_cache_mb, read_threads)."""
    return {"cache_bytes": data.read_cache_mb << 20, "read_threads": data.read_threads}


def order_settings(data: Any) -> dict[str, Any]:
    """DistributedLoader's order settings of a new run from a DataConfig (order_chunk,
    order_window, prefetch_steps)."""
    order = Order(BLOCKS, chunk=data.order_chunk, window=data.order_window)
    return {"order": order, "prefetch_steps": data.prefetch_steps}
