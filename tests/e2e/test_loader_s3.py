"""The loader on a real S3-compatible server (moto, tests/s3server.py): reads of an object
store are ranged row-group reads, and they give the batches a local copy gives. The same
reader on local files: tests/unit/test_loader.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic_shards import SHARD_ROWS, expected_row, ids_of_step, make_loader, write_dataset

from data_pipeline.loader import TokenShards

pytestmark = pytest.mark.slow


def test_object_store_reads_are_ranged_row_group_reads(s3, tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", SHARD_ROWS, row_group=3)
    uri = s3.unique_uri("rowgroups")
    for f in root.iterdir():
        s3.client().upload_file(str(f), s3.bucket, f"{uri.split('/', 3)[3]}/{f.name}")
    remote = TokenShards(uri, "train", read_threads=3)
    assert remote.file_cache is None  # no whole-file copies
    ids = np.array([8, 30, 9])
    np.testing.assert_array_equal(remote.get_batch(ids), np.stack([expected_row(i) for i in ids]))
    assert remote._groups.loads == 2 and remote._footers.loads == 2
    local = TokenShards(str(root), "train")
    for consumed in (0, 24):  # and across the epoch boundary
        a = make_loader(remote, consumed_samples=consumed)
        b = make_loader(local, consumed_samples=consumed)
        for _ in range(3):
            assert ids_of_step(a.next_step()) == ids_of_step(b.next_step())
        a.close()
        b.close()
    assert remote._footers.loads == len(SHARD_ROWS)
    remote.close()
