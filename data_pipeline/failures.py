"""Failures from below, as one line: a full disk, a permission lost mid-run, a read-only
remount, a vanished directory, an object store that kept failing through the retry budget.

Every entry point's edge (data_pipeline/prepare.py, trainer/train.py, trainer/export.py, the
sweeps in trainer/driver/sweep/) hands what it caught to `describe`, with what is safe for its
own work, and prints the line it returns with the exit status (2: the user can fix it; the
errors this module does not recognise are left to the caller, which treats them as bugs, 1).

    line = describe(exc, safe="no manifest was written; rerun to resume")
    # 'write /data/x/train-00003.parquet: ENOSPC (No space left on device); no manifest was
    #  written; rerun to resume; free space on the filesystem of /data/x (or choose another
    #  data.out_dir), then run the same command again'

It finds the OSError inside what Ray, DeepSpeed or shutil wrapped it in (a cause chain, a
shutil.Error's list of (src, dst, reason) tuples, a Ray worker's error text).
"""

from __future__ import annotations

import errno
import re
import shutil
from dataclasses import dataclass
from typing import Optional

from data_pipeline import storage

# errno -> what to do (the path is put in for {path})
REMEDIES = {
    errno.ENOSPC: "free space on the filesystem of {path} (or point it elsewhere), then run "
    "the same command again",
    errno.EDQUOT: "free space in your quota on {path} (or point it elsewhere), then run the "
    "same command again",
    errno.EFBIG: "the file grew past the size this process may write (ulimit -f) or the "
    "filesystem allows: raise the limit or point it elsewhere, then run the same command again",
    errno.EACCES: "give this user write access to {path} (or point it elsewhere), then run "
    "the same command again",
    errno.EPERM: "give this user write access to {path} (or point it elsewhere), then run the "
    "same command again",
    errno.EROFS: "{path} is on a read-only filesystem (remounted read-only after an error?): "
    "make it writable or point it elsewhere, then run the same command again",
    errno.ENOENT: "{path} vanished while in use (deleted, or its filesystem unmounted?): "
    "restore it, then run the same command again",
    errno.ENOTDIR: "a part of {path} is not a directory: fix the path, then run again",
    errno.EIO: "the disk under {path} reported an I/O error: check it, then run again",
}
_ERRNO_IN_TEXT = re.compile(r"\[?[Ee]rrno:? (\d+)\]?")
_PATH_IN_TEXT = re.compile(r"(?:: |file |to |')(/[^\s':,)\]]+)")


@dataclass(frozen=True)
class Fault:
    op: str  # "write", "read", "copy", ... as far as it can be told
    path: str
    code: str  # "ENOSPC", "SLOW_DOWN", "HTTP 503"...
    reason: str
    remedy: str


def find_oserror(e: BaseException) -> Optional[BaseException]:
    """The OSError (or object-store StorageError) at the bottom of `e`, or None."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, storage.StorageError) or (
            isinstance(cur, OSError) and storage.is_transient(cur)
        ):
            return cur  # (a raw transient one: a read no retry of ours wrapped)
        if isinstance(cur, shutil.Error) and cur.args and isinstance(cur.args[0], list):
            reasons = [t[2] for t in cur.args[0] if isinstance(t, tuple) and len(t) == 3]
            if reasons:
                return _from_text(str(reasons[0]), cur.args[0][0][1]) or cur
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        if isinstance(cur, OSError) and _from_text(str(cur)) is not None:
            return _from_text(str(cur))
        stack += [cur.__cause__, cur.__context__, getattr(cur, "cause", None)]
        workers = getattr(cur, "worker_failures", None) or getattr(cur, "_worker_failures", None)
        if isinstance(workers, dict):
            stack += list(workers.values())
    # Ray may hand the driver only a worker's traceback text.
    return _from_text(str(e))


def _from_text(text: str, path: Optional[str] = None) -> Optional[OSError]:
    m = _ERRNO_IN_TEXT.search(text)
    if not m:
        return None
    code = int(m.group(1))
    if path is None:
        p = _PATH_IN_TEXT.search(text)
        path = p.group(1) if p else None
    return OSError(code, errno.errorcode.get(code, "?") and _strerror(code), path)


def _strerror(code: int) -> str:
    import os

    return os.strerror(code)


def classify(e: BaseException, where: Optional[str] = None) -> Optional[Fault]:
    """What went wrong below, if it is a failure of the disk or the store the user can fix or
    wait out; None for anything else (a bug: the caller's exit status 1)."""
    found = find_oserror(e)
    if found is None:
        return None
    if isinstance(found, storage.StorageError):
        if not storage.is_transient(found):
            return None  # the caller's own StorageError line (bad URI, bucket, credentials)
        code = storage.store_code(found) or "store failing"
        return Fault("use", _uri_of(str(found)), code, storage.one_line(found), "")
    if found.errno is None and storage.is_transient(found):
        code = storage.store_code(found) or "store failing"
        reason = f"the object store failed: {storage.one_line(found)}"
        remedy = "it is throttled or down, not the data: run the same command again later"
        return Fault("read", where or "the object store", code, reason, remedy)
    code = found.errno
    if code not in REMEDIES:
        return None
    path = found.filename or _uri_of(str(found)) or where or "?"
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS) and found.filename2:
        path = found.filename2  # a copy (shutil's sendfile) names its source first
    op = _op_of(e, found)
    reason = found.strerror or errno.errorcode.get(code, str(code))
    remedy = REMEDIES[code].format(path=path)
    return Fault(op, str(path), errno.errorcode.get(code, str(code)), reason, remedy)


def describe(e: BaseException, *, safe: str, where: Optional[str] = None) -> Optional[str]:
    """One line for a failure below (classify), with `safe` (what was kept, what was not
    registered) and what to do; None when `e` is not one (the caller reports a bug, exit 1).
    where: the path to name when the error names none."""
    f = classify(e, where)
    if f is None:
        return None
    if f.remedy:
        return f"{f.op} {f.path}: {f.code} ({f.reason}); {safe}; {f.remedy}"
    # an object store that kept failing: its message names the URI, the code and the tries
    return f"{f.reason}; {safe}"


def _uri_of(text: str) -> str:
    m = re.search(r"((?:s3|gs|gcs)://[^\s:]+|/[^\s:'\"]+)", text)
    return m.group(1) if m else ""


def _op_of(e: BaseException, found: OSError) -> str:
    """The operation: a copy for shutil's errors, else what the errno implies (writes are what
    fail under a run: its files are written, the inputs were checked before it began)."""
    if isinstance(e, shutil.Error):
        return "copy"
    return {errno.ENOENT: "open", errno.ENOTDIR: "open", errno.EIO: "use"}.get(found.errno, "write")
