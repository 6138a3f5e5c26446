"""A small synthetic token dataset that tests/unit/test_loader.py and
tests/e2e/test_loader_s3.py share: shards whose row i is i * 100 + [0, 1, ..., seq_len], so a
batch names the samples it holds, and a loader over it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_pipeline.loader import DistributedLoader, TokenShards
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


def write_dataset(
    root: Path, shard_rows: list[int], *, fixed_size: bool = True, row_group: Optional[int] = None
) -> Path:
    """Shards of shard_rows rows (one row group each, or row groups of `row_group` rows)."""
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
        table = pa.table({"tokens": column})
        pq.write_table(table, root / name, compression="zstd", row_group_size=row_group)
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


def make_loader(shards: TokenShards, **kwargs: object) -> DistributedLoader:
    args: dict = dict(global_batch=8, micro_batch=2, dp_rank=0, dp_size=1, seed=7)
    args.update(kwargs)
    return DistributedLoader(shards, **args)


def ids_of_step(step: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """Recover sample ids from the synthetic token values (first input token = id * 100)."""
    return [int(x) // 100 for inputs, _ in step for x in inputs[:, 0]]
