"""data_pipeline.storage on local paths (object stores: tests/e2e with a real S3 server)."""

from __future__ import annotations

import os

import pytest

from data_pipeline import storage


def test_uris_keep_their_scheme_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("s3://bucket/runs/") == "s3://bucket/runs"
    assert storage.absolute("gs://b/x") == "gs://b/x"
    assert storage.absolute("runs") == str(tmp_path / "runs")
    assert storage.absolute("file:///data/x") == "/data/x"
    assert storage.join("s3://b/runs", "r", "/checkpoint_1/") == "s3://b/runs/r/checkpoint_1"
    assert storage.is_remote("s3://b") and storage.is_remote("gs://b")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert storage.name("s3://b/runs/r/") == "r"


def test_files_and_listings(tmp_path):
    root = str(tmp_path / "d")
    storage.write_text(storage.join(root, "a", "x.json"), "{}")
    storage.write_bytes(storage.join(root, "b.bin"), b"12345")
    assert storage.read_text(storage.join(root, "a", "x.json")) == "{}"
    assert storage.listdir(root) == ["a", "b.bin"]
    assert storage.walk_files(root) == {"a/x.json": 2, "b.bin": 5}
    assert storage.is_dir(storage.join(root, "a")) and storage.is_file(storage.join(root, "b.bin"))
    assert storage.listdir(storage.join(root, "missing")) == []
    assert [p for p in os.listdir(tmp_path / "d") if p.endswith(".tmp")] == []  # atomic writes
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(root, "missing.json"))
    storage.move(storage.join(root, "a"), storage.join(root, "c", "a"))
    assert storage.walk_files(root) == {"c/a/x.json": 2, "b.bin": 5}
    storage.delete(storage.join(root, "c"))
    assert storage.listdir(root) == ["b.bin"]


def test_local_copy_of_a_local_path_is_the_path_itself(tmp_path):
    with storage.local_copy(str(tmp_path)) as p:
        assert p == tmp_path


def test_check_writable_names_the_setting_and_writes_nothing(tmp_path):
    storage.check_writable(str(tmp_path / "new" / "deeper"), "run.root")
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(storage.StorageError) as e:
        storage.check_writable(str(tmp_path / "file" / "sub"), "data.out_dir")
    assert str(e.value) == (
        f"data.out_dir ({tmp_path / 'file' / 'sub'}): {tmp_path / 'file'} exists and is not a "
        "directory"
    )
    with pytest.raises(storage.StorageError, match=r"scheme 'ftp://' is not supported"):
        storage.check_writable("ftp://host/x", "run.root")
