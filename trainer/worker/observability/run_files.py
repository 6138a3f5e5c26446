"""A worker's view of the run directory, wherever it lives.

Every rank writes its run files (rank 0: metrics.jsonl, eval.jsonl, summary.json, loss.png,
the W&B offline run; every rank: samples/, memory/, profile/) into a local directory. On a
local or shared path that directory IS the run directory. On object storage it is a private
temp dir synced to the run URI at log, eval and checkpoint time (`sync`), so a killed run
loses at most the rows since its last sync. A resumed run first downloads the append-only
files it continues (its own samples file, rank 0's metrics/eval), so it appends to them,
after `rewind` set aside the rows of steps after its checkpoint (a history holds each step
once).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from data_pipeline import storage

# Files a rank appends to across invocations (downloaded before a resumed run appends).
RANK0_APPENDS = ("metrics.jsonl", "eval.jsonl")


def per_step_files(rank: int) -> list[str]:
    """The per-step JSON-lines files `rank` appends to (each row has a "step")."""
    return [f"samples/rank_{rank}.jsonl", *(RANK0_APPENDS if rank == 0 else ())]


def rewound_name(rel: str, n: int) -> str:
    """Where rewind n keeps the rows of `rel` it set aside: rewound-<n>/<rel> (a folder per
    rewind, so `samples/rank_*.jsonl` still names the live files only)."""
    return f"rewound-{n}/{rel}"


def split_rows(text: str, step: int) -> tuple[str, str]:
    """(the lines of rows with step <= `step`, the other lines: later steps, and a line that
    is not a whole JSON row, e.g. half a row written when the run was killed)."""
    keep, later = [], []
    for line in text.splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            row_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            row_step = None
        whole = line.endswith("\n") and isinstance(row_step, int)
        (keep if whole and row_step <= step else later).append(line)
    return _lines(keep), _lines(later)


def _lines(lines: list[str]) -> str:
    return "".join(ln if ln.endswith("\n") else ln + "\n" for ln in lines)


class RunFiles:
    def __init__(
        self, run_uri: str, rank: int, *, min_sync_s: float = 10.0, stage: bool | None = None
    ):
        """stage: write into a local staging dir and upload on sync (default: for object
        storage only; a slow network mount may want it too)."""
        self.uri = run_uri
        self.rank = rank
        self.remote = storage.is_remote(run_uri) if stage is None else stage
        self.min_sync_s = min_sync_s
        self._last_sync = 0.0
        self._synced: dict[str, tuple[int, int]] = {}
        if not self.remote:
            self.local = Path(run_uri)
            self.local.mkdir(parents=True, exist_ok=True)
            return
        self.local = Path(tempfile.mkdtemp(prefix=f"raygpt-run-rank{rank}-"))
        for rel in per_step_files(rank):
            try:
                storage.download(storage.join(run_uri, rel), self._mk(rel))
            except FileNotFoundError:
                continue
            self._synced[rel] = self._stamp(self.local / rel)

    def _mk(self, rel: str) -> Path:
        p = self.local / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def path(self, rel: str) -> Path:
        """Where to write `rel` (parents created)."""
        return self._mk(rel)

    @staticmethod
    def _stamp(p: Path) -> tuple[int, int]:
        st = p.stat()
        return st.st_size, st.st_mtime_ns

    def sync(self, *, force: bool = True) -> int:
        """Uploads the files changed since the last sync; returns how many. `force=False`
        skips unless min_sync_s passed since the last sync (called on every logged step)."""
        if not self.remote:
            return 0
        now = time.monotonic()
        if not force and now - self._last_sync < self.min_sync_s:
            return 0
        self._last_sync = now
        n = 0
        for p in sorted(self.local.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(self.local).as_posix()
            try:
                stamp = self._stamp(p)
            except FileNotFoundError:  # W&B rotates its temp files
                continue
            if self._synced.get(rel) == stamp:
                continue
            if not p.exists():  # removed since it was listed
                continue
            storage.upload(p, storage.join(self.uri, rel))
            self._synced[rel] = stamp
            n += 1
        return n

    def rewind(self, step: int) -> dict[str, int]:
        """Resuming from a checkpoint at `step`: moves this rank's per-step rows of later steps
        (logged after that checkpoint by the run that was killed or restarted) out of its
        files into rewound-<n>/ in the run directory (n = 1, 2, ... per rewind; never deleted),
        so the history holds each step once. The set-aside file is written before
        the file is rewritten (a kill in between leaves rows twice, never lost); on object
        storage both are uploaded at once. Returns file -> rows set aside (none: {})."""
        moved: dict[str, int] = {}
        for rel in per_step_files(self.rank):
            path = self.local / rel
            if not path.is_file():
                continue
            keep, later = split_rows(path.read_text(), step)
            if not later:
                continue
            n = 1
            while self._exists(rewound_name(rel, n)):
                n += 1
            aside = self.path(rewound_name(rel, n))
            aside.write_text(later)
            tmp = path.with_name(f".{path.name}.rewind.tmp")
            tmp.write_text(keep)
            os.replace(tmp, path)
            moved[rel] = later.count("\n")
        if moved:
            self.sync()
        return moved

    def _exists(self, rel: str) -> bool:
        if (self.local / rel).exists():
            return True
        return self.remote and storage.exists(storage.join(self.uri, rel))

    def close(self) -> None:
        """Final sync; a temp staging dir is removed."""
        if self.remote:
            self.sync()
            shutil.rmtree(self.local, ignore_errors=True)
