"""Deterministic, rank-sharded, resumable batches over prepared token shards.

The sample order is a function of (seed, global position) only: position p belongs to epoch
p // N and maps to permutation_e[p % N] with permutation_e = default_rng([seed, e]).permutation(N).
A global step covers positions [consumed, consumed + global_batch); rank r of dp_size takes the
r-th contiguous slice of global_batch / dp_size positions and cuts it into micro batches. So the
union over ranks of a step's samples does not depend on the world size, and resuming needs only
consumed_samples.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_pipeline.config import DataError
from data_pipeline.manifest import Manifest

Step = list[tuple[torch.Tensor, torch.Tensor]]


class TokenShards:
    """Random access to the samples (rows of seq_len + 1 int32 tokens) of one split."""

    def __init__(self, data_dir: str, split: str, *, cache_shards: int = 8):
        self.data_dir = Path(data_dir)
        self.manifest = Manifest.load(data_dir)
        if split not in self.manifest.splits:
            raise DataError(
                f"split {split!r} not in {str(data_dir)!r} (splits: "
                f"{', '.join(self.manifest.splits)})"
            )
        self.split = split
        self.seq_len = self.manifest.seq_len
        self.row_len = self.seq_len + 1
        shards = self.manifest.splits[split].shards
        self._files = [self.data_dir / s.file for s in shards]
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
        column = pq.read_table(self._files[index], columns=["tokens"]).column("tokens")
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


def _to_rows(array: pa.Array, row_len: int, path: Path) -> np.ndarray:
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
            raise ValueError(f"split {shards.split!r} of {str(shards.data_dir)!r} has no samples")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
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
    def steps_per_epoch(self) -> int:
        return len(self.shards) // self.global_batch

    def sample_ids_for_step(self, consumed: int) -> np.ndarray:
        """This rank's sample ids, in micro-batch order, for the step starting at `consumed`."""
        per_rank = self.global_batch // self.dp_size
        positions = consumed + self.dp_rank * per_rank + np.arange(per_rank, dtype=np.int64)
        return sample_ids_at(positions, len(self.shards), self.seed, self.shuffle)

    def _load_step(self, consumed: int) -> Step:
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

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self._consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore consumed_samples and seed (the checkpoint's order wins)."""
        self.seed = int(state["seed"])
        self._consumed = int(state["consumed_samples"])
        self._next = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            self._next = None
