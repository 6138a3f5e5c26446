"""Faults of the local disk under prepare: a full disk, a file-size limit, a directory made
read-only. Each ends in one `error:` line naming the operation, the path and the errno, what is
safe and what to do, with exit status 2 and no manifest; the rerun once the cause is gone
finishes with the same bytes as a prepare that never failed (conftest.smoke_data).
The line itself, for every errno and the wrappings of Ray/shutil: tests/unit/test_failures.py.
"""

from __future__ import annotations

import errno
import os
import pathlib
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import ROOT

from data_pipeline.manifest import Manifest
from data_pipeline.prepare import main

pytestmark = pytest.mark.slow


def same_dataset(got: Path, want: str) -> None:
    a, b = Manifest.load(str(got)), Manifest.load(want)
    assert a.fingerprint == b.fingerprint and a.files() == b.files()
    for f in a.files():
        assert (got / f).read_bytes() == (Path(want) / f).read_bytes(), f
    assert not list(got.parent.glob("*.partial-*")) and not list(got.rglob("*.tmp"))


def test_a_full_disk_during_prepare_is_one_line_and_the_rerun_resumes(
    tmp_path, smoke_data, monkeypatch, capsys
) -> None:
    """No space left at the third Parquet shard: a fault injected at the file-write boundary
    (storage.write_bytes writes through Path.write_bytes), the rest of the disk as it is."""
    out = tmp_path / "data"
    real = pathlib.Path.write_bytes
    shards = []

    def full_disk(self, data):
        if ".parquet" in self.name:
            shards.append(self.name)
            if len(shards) >= 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "write_bytes", full_disk)
        assert main(["+experiment=smoke", f"data.out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: write "), err
    line = err[0]
    assert f"{out}" in line and "ENOSPC (No space left on device)" in line
    assert "no manifest was written" in line and "free space on the filesystem of" in line
    assert not (out / "manifest.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))  # the failed write left no temp file
    assert main(["+experiment=smoke", f"data.out_dir={out}"]) == 0
    same_dataset(out, smoke_data)


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.drill  # two prepares in subprocesses (~30 s loaded); make test keeps the one above
def test_a_file_size_limit_is_one_line_exit_2_and_the_rerun_finishes(tmp_path, smoke_data):
    """A real limit of the kernel's (ulimit -f): no root, no fault injection."""
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "data_pipeline.prepare", "+experiment=smoke",
           f"data.out_dir={out}"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
        preexec_fn=_file_size_limit(16 * 1024),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "EFBIG (File too large)" in err[0] and str(out) in err[0] and "ulimit -f" in err[0]
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    same_dataset(out, smoke_data)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_one_line_exit_2(tmp_path, smoke_data, capsys) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main(["+experiment=smoke", f"data.out_dir={parent / 'data'}"]) == 2
    finally:
        parent.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(parent) in err[0] and "not writable" in err[0], err
    assert main(["+experiment=smoke", f"data.out_dir={parent / 'data'}"]) == 0
    same_dataset(parent / "data", smoke_data)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 16 MiB tmpfs (a real filesystem that fills up); skipped where mounting is not allowed
    (it needs root or CAP_SYS_ADMIN)."""
    where = tmp_path / "small"
    where.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


@pytest.mark.drill  # two training runs (~4 min loaded)
@pytest.mark.timeout(1800)
def test_a_disk_full_during_a_checkpoint_is_one_line_and_the_rerun_resumes(
    small_tmpfs, smoke_data
) -> None:
    """A run whose disk fills at its second checkpoint (the first, 2.2 MB, fits into 3.5 MB):
    one line naming the checkpoint's file and ENOSPC, exit 2, the half-written checkpoint not
    registered; freed, the same command resumes from the first and logs the same losses."""
    import json

    from test_interruptions import Run

    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (12 * 1024 * 1024 + 512 * 1024))
    args = [
        "+experiment=smoke", "logging.mode=disabled", "precision=fp32", "cluster.num_workers=1",
        "trainer.global_batch_size=4", "trainer.max_steps=4", "trainer.checkpoint_interval=2",
        "trainer.keep_last=3", "trainer.eval_interval=0", "trainer.sample_tokens=0",
        f"data.out_dir={smoke_data}", f"run.root={small_tmpfs}", "run.name=full",
    ]  # fmt: skip
    run_dir = small_tmpfs / "full"
    first = Run(args, small_tmpfs.parent / "first.log")
    assert first.wait(900) == 2, first.output[-3000:]
    err = [ln for ln in first.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in first.output, first.output[-3000:]
    assert err[0].startswith(f"error: write {run_dir}/checkpoint_00000004/"), err
    assert "ENOSPC (No space left on device)" in err[0] and "free space on" in err[0]
    index = json.loads((run_dir / "checkpoints.json").read_text())
    assert [c["name"] for c in index["checkpoints"]] == ["checkpoint_00000002"]

    def losses() -> dict[int, float]:
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, rows) if "loss" in r}

    before = losses()
    filler.unlink()
    second = Run(args, small_tmpfs.parent / "second.log")
    assert second.wait(900) == 0, second.output[-3000:]
    assert f"resumed from {run_dir}/checkpoint_00000002 at step 2" in second.output
    after = losses()
    assert sorted(after) == [1, 2, 3, 4] and all(after[s] == before[s] for s in before)
    index = json.loads((run_dir / "checkpoints.json").read_text())
    assert [c["name"] for c in index["checkpoints"]][-1] == "checkpoint_00000004"
