"""data_pipeline/failures.py: an OS or object-store failure below, wrapped as Ray, DeepSpeed or
shutil wrap it, becomes one line: the operation, the path, the errno name, what is safe and what
to do. Real full disks and read-only directories: tests/e2e/test_disk_faults.py."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from data_pipeline import storage
from data_pipeline.failures import classify, describe

SAFE = "nothing was registered"


@pytest.mark.parametrize(
    "code, name, remedy",
    [
        (errno.ENOSPC, "ENOSPC", "free space on the filesystem of /data/x"),
        (errno.EACCES, "EACCES", "give this user write access to /data/x"),
        (errno.EPERM, "EPERM", "give this user write access to /data/x"),
        (errno.EROFS, "EROFS", "/data/x is on a read-only filesystem"),
        (errno.ENOENT, "ENOENT", "/data/x vanished while in use"),
        (errno.EFBIG, "EFBIG", "ulimit -f"),
    ],
)
def test_each_errno_is_one_line_with_a_remedy(code: int, name: str, remedy: str) -> None:
    line = describe(OSError(code, os.strerror(code), "/data/x"), safe=SAFE)
    assert line is not None and "\n" not in line
    assert line.startswith(f"{'open' if code == errno.ENOENT else 'write'} /data/x: {name} (")
    assert SAFE in line and remedy in line


def test_a_shutil_error_is_its_first_reason_not_its_repr() -> None:
    """The 1,831-character line of a checkpoint save on a full disk: shutil.copytree's Error
    lists (src, dst, reason) for every file."""
    files = [
        (f"/tmp/ckpt/f{i}", f"/runs/r/checkpoint_00000010/f{i}",
         "[Errno 28] No space left on device")
        for i in range(6)
    ]  # fmt: skip
    line = describe(shutil.Error(files), safe=SAFE)
    assert line is not None and len(line) < 400
    assert line.startswith("copy /runs/r/checkpoint_00000010/f0: ENOSPC (No space left on device)")


def test_wrapped_as_ray_and_deepspeed_wrap_it() -> None:
    class RayTaskError(Exception):  # what Ray raises on the driver: .cause is the worker's
        def __init__(self, cause):
            super().__init__("the worker failed")
            self.cause = cause

    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/runs/r/metrics.jsonl")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        wrapped = RayTaskError(outer)
    f = classify(wrapped)
    assert f is not None and (f.code, f.path) == ("EROFS", "/runs/r/metrics.jsonl")
    # only the text of the worker's traceback reached the driver
    text = RuntimeError("Traceback ...\nOSError: [Errno 28] No space left on device: '/r/x'")
    assert classify(text).code == "ENOSPC" and classify(text).path == "/r/x"


def test_a_store_failing_through_the_budget_keeps_its_own_line() -> None:
    err = storage.StorageError("s3://b/k: cannot read: the object store kept failing (SLOW_DOWN)")
    err.transient = True
    assert describe(err, safe=SAFE) == f"{err}; {SAFE}"


@pytest.mark.parametrize(
    "e",
    [
        ValueError("a bug"),
        KeyError("x"),
        OSError(errno.EBADF, "Bad file descriptor"),  # ours: a bug, not the disk
        storage.StorageError("s3://b: the bucket does not exist"),  # the caller's own line
    ],
)
def test_anything_else_is_left_to_the_caller(e: BaseException) -> None:
    assert describe(e, safe=SAFE) is None


def test_a_raw_transient_store_error_is_one_line_too() -> None:
    """One that no retry of ours wrapped (what reached the driver before file_sha256 retried)."""
    e = OSError("AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush")
    line = describe(RuntimeError("worker failed").with_traceback(None), safe=SAFE)
    assert line is None
    wrapped = RuntimeError("worker failed")
    wrapped.__cause__ = e
    line = describe(wrapped, safe=SAFE, where="s3://b/run")
    assert line.startswith("read s3://b/run: INTERNAL_FAILURE (the object store failed: ")
    assert SAFE in line and "run the same command again later" in line


def test_a_failed_copy_names_its_destination() -> None:
    """shutil.copyfile on a full disk raises ENOSPC naming the source, then the destination."""
    e = OSError(errno.ENOSPC, "No space left on device", "/tmp/stage/x.pt", None, "/runs/r/x.pt")
    assert describe(e, safe=SAFE).startswith("write /runs/r/x.pt: ENOSPC")


def test_a_path_from_the_caller_when_the_error_names_none() -> None:
    line = describe(OSError(errno.ENOSPC, "No space left on device"), safe=SAFE, where="/d")
    assert line.startswith("write /d: ENOSPC")
