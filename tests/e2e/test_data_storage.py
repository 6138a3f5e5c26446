"""data.out_dir on object storage: prepare writes its shards to a real S3-compatible server
(moto, tests/s3server.py) from real Ray tasks, and the loader reads them back.

One S3 prepare of the smoke dataset per module, compared with the session's local one
(conftest.smoke_data): the same settings give byte-identical files, so the two must match byte
for byte and the loader must yield the same batches from either.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import storage
from data_pipeline.config import DataError
from data_pipeline.loader import DistributedLoader, ShardCache, TokenShards
from data_pipeline.manifest import Manifest, read_manifest
from data_pipeline.prepare import main, prepare, version_of
from data_pipeline.tokenizer import file_sha256

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session(s3) -> Iterator[None]:
    """One Ray for the module, started after the S3 environment is set."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def smoke_cfg(smoke_overrides: list[str]):
    from trainer.config import load_config

    return load_config([*smoke_overrides, "data.out_dir=s3://placeholder/x"]).data


@pytest.fixture(scope="module")
def s3_data(s3, ray_session, smoke_cfg) -> tuple[str, Manifest]:
    """The smoke dataset prepared into s3://<bucket>/data (once per module)."""
    uri = s3.uri("data")
    return uri, prepare(dataclasses.replace(smoke_cfg, out_dir=uri))


@pytest.fixture(scope="module")
def local_data(ray_session, smoke_data: str) -> str:
    return smoke_data  # prepared with this module's Ray when the session has not done it yet


def object_stamps(s3, prefix: str) -> dict[str, tuple[str, object]]:
    """key -> (ETag, LastModified) of every object under prefix (not the empty "dir/" markers
    that pyarrow writes after deleting an object)."""
    out = {}
    for page in (
        s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    ):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                out[obj["Key"]] = (obj["ETag"], obj["LastModified"])
    return out


def no_s3_folder_anywhere(*roots: Path) -> None:
    """The old bug: an s3:// out_dir became a local folder named `s3:`."""
    for root in roots:
        assert not (root / "s3:").exists(), root
        assert not list(root.rglob("s3:*")), root


def data_keys(s3, prefix: str) -> list[str]:
    return [k for k in s3.keys(prefix + "/") if not k.endswith("/")]  # not directory markers


# ---------------------------------------------------------------------------- prepare


def test_prepare_writes_shards_and_manifest_to_the_bucket(
    s3, s3_data, local_data: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    uri, manifest = s3_data
    version = version_of(manifest.settings)
    keys = data_keys(s3, "data")
    # exactly the dataset's files: the manifest and the files it names, in its version prefix
    assert keys == sorted(["data/manifest.json", *(f"data/{f}" for f in manifest.files())])
    assert all(f.startswith(f"{version}/") for f in manifest.files())
    assert read_manifest(uri) == manifest == Manifest.load(uri)
    # byte for byte what the same settings give on local disk
    local = Manifest.load(local_data)
    assert local.settings == manifest.settings and local.fingerprint == manifest.fingerprint
    assert [f.removeprefix(f"{version}/") for f in manifest.files()] == local.files()
    for remote_file, local_file in zip(manifest.files(), local.files()):
        assert s3.read(f"data/{remote_file}") == (Path(local_data) / local_file).read_bytes()
    assert manifest.tokenizer.sha256 == file_sha256(storage.join(uri, manifest.tokenizer.file))
    for split, info in manifest.splits.items():
        assert info.num_samples == local.splits[split].num_samples > 0
    no_s3_folder_anywhere(Path.cwd(), tmp_path_factory.getbasetemp())


def test_prepare_again_does_nothing(s3, s3_data, smoke_cfg) -> None:
    uri, manifest = s3_data
    before = object_stamps(s3, "data/")
    again = prepare(dataclasses.replace(smoke_cfg, out_dir=uri))
    assert again == manifest
    assert object_stamps(s3, "data/") == before


def test_changed_settings_refused_failed_prepare_harmless_overwrite_replaces(
    s3, s3_data, smoke_cfg
) -> None:
    src, manifest = s3_data
    uri = s3.unique_uri("copy")
    storage.copy_tree(src, uri)
    prefix = uri.split("/", 3)[3]
    stamps = object_stamps(s3, prefix + "/")
    assert read_manifest(uri) == manifest
    changed = dataclasses.replace(smoke_cfg, out_dir=uri, seq_len=32)
    with pytest.raises(DataError, match=r"\(changed: seq_len\); pick another data.out_dir"):
        prepare(changed)
    assert object_stamps(s3, prefix + "/") == stamps
    # a prepare that fails after writing files (no task gets one row) leaves the dataset as is
    failing = dataclasses.replace(smoke_cfg, out_dir=uri, seq_len=100_000)
    with pytest.raises(DataError, match="val split has 0 samples"):
        prepare(failing, overwrite=True)
    assert object_stamps(s3, prefix + "/") == stamps
    # overwrite: the new version is committed and the old one is gone
    rebuilt = prepare(changed, overwrite=True)
    assert rebuilt.seq_len == 32 and read_manifest(uri) == rebuilt
    assert data_keys(s3, prefix) == sorted(
        [f"{prefix}/manifest.json", *(f"{prefix}/{f}" for f in rebuilt.files())]
    )
    assert version_of(rebuilt.settings) != version_of(manifest.settings)
    assert len(TokenShards(uri, "train")) == rebuilt.splits["train"].num_samples


# ---------------------------------------------------------------------------- the loader


def steps(shards: TokenShards, n: int, **kwargs) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    loader = DistributedLoader(shards, micro_batch=2, dp_rank=0, dp_size=1, seed=3, **kwargs)
    try:
        return [loader.next_step() for _ in range(n)]
    finally:
        loader.close()


def same_steps(a, b) -> bool:
    return all(
        torch.equal(x, ex) and torch.equal(y, ey)
        for step, expected in zip(a, b, strict=True)
        for (x, y), (ex, ey) in zip(step, expected, strict=True)
    )


def test_loader_reads_s3_as_it_reads_local(s3_data, local_data: str, tmp_path: Path) -> None:
    uri, manifest = s3_data
    cache = ShardCache(tmp_path / "cache", max_bytes=1 << 30)
    remote = TokenShards(uri, "train", cache=cache)
    local = TokenShards(local_data, "train")
    assert len(remote) == len(local) and remote.vocab_size == local.vocab_size
    every = np.arange(len(local))
    np.testing.assert_array_equal(remote.get_batch(every), local.get_batch(every))
    shards = manifest.splits["train"].shards
    assert cache.downloads == len(shards) == len(cache.cached())
    for start in (0, len(local) - 20):  # the first steps, and across the epoch boundary
        kw = dict(global_batch=8, consumed_samples=start)
        assert same_steps(steps(remote, 6, **kw), steps(local, 6, **kw))
    assert cache.downloads == len(shards)  # served from the cache
    val_remote = TokenShards(uri, "val", cache=cache)
    val_local = TokenShards(local_data, "val")
    kw = dict(global_batch=2, shuffle=False)
    assert same_steps(steps(val_remote, 3, **kw), steps(val_local, 3, **kw))


def test_loader_with_a_cache_smaller_than_the_data(s3_data, local_data: str, tmp_path) -> None:
    uri, manifest = s3_data
    sizes = [storage.size(storage.join(uri, s.file)) for s in manifest.splits["train"].shards]
    bound = max(sizes) + 1  # one shard at a time
    cache = ShardCache(tmp_path / "small", max_bytes=bound)
    remote = TokenShards(uri, "train", cache_shards=1, cache=cache)
    local = TokenShards(local_data, "train")
    for got, expected in zip(steps(remote, 4, global_batch=8), steps(local, 4, global_batch=8)):
        assert same_steps([got], [expected])
        assert cache.total_bytes() <= bound
    remote.close()  # its read-ahead may still be fetching (evicted the old copy, new one not in)
    assert len(cache.cached()) == 1 and cache.downloads > len(sizes) // 2  # one at a time
    # no cache given: object stores are read by ranged row-group requests, no local copies
    assert TokenShards(uri, "val").file_cache is None
    assert TokenShards(local_data, "val").file_cache is None


# ---------------------------------------------------------------------------- bad storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unusable_object_storage_is_one_line_and_writes_nothing(
    s3, smoke_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    buckets = {b["Name"] for b in s3.client().list_buckets()["Buckets"]}
    missing = "s3://no-such-bucket-raygpt/data"
    with pytest.raises(DataError) as err:
        prepare(dataclasses.replace(smoke_cfg, out_dir=missing))
    message = str(err.value)
    assert "\n" not in message and missing in message and "bucket does not exist" in message
    assert {b["Name"] for b in s3.client().list_buckets()["Buckets"]} == buckets
    with pytest.raises(DataError, match="no manifest.json in 's3://no-such-bucket-raygpt/data'"):
        TokenShards(missing, "train")
    # the command line: one `error:` line, exit code 2
    assert main(["+experiment=smoke", f"data.out_dir={missing}"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith(f"error: data.out_dir ({missing})")

    fresh = s3.unique_uri("nocreds")
    with monkeypatch.context() as m:
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
            m.delenv(var, raising=False)
        m.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        m.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        with pytest.raises(DataError) as err:
            prepare(dataclasses.replace(smoke_cfg, out_dir=fresh))
    message = str(err.value)
    assert "\n" not in message and fresh in message and "missing credentials" in message

    nowhere = s3.unique_uri("unreachable")
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
        with pytest.raises(DataError) as err:
            prepare(dataclasses.replace(smoke_cfg, out_dir=nowhere))
    message = str(err.value)
    assert "\n" not in message and nowhere in message and "cannot be reached" in message

    for uri in (fresh, nowhere):
        assert s3.keys(uri.split("/", 3)[3]) == []
    assert list(tmp_path.iterdir()) == []  # nothing local either (no `s3:` folder)
