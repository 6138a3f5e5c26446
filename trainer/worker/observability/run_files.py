"""A worker's view of the run directory, wherever it lives.

Every rank writes its run files (rank 0: metrics.jsonl, eval.jsonl, summary.json, loss.png,
the W&B offline run; every rank: samples/, memory/, profile/) into a local directory. On a
local or shared path that directory IS the run directory. On object storage it is a private
temp dir synced to the run URI at log, eval and checkpoint time (`sync`), so a killed run
loses at most the rows since its last sync. A resumed run first downloads the append-only
files it continues (its own samples file, rank 0's metrics/eval), so it appends to them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from data_pipeline import storage

# Files a rank appends to across invocations (downloaded before a resumed run appends).
RANK0_APPENDS = ("metrics.jsonl", "eval.jsonl")


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
        appends = [f"samples/rank_{rank}.jsonl", *(RANK0_APPENDS if rank == 0 else ())]
        for rel in appends:
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

    def close(self) -> None:
        """Final sync; a temp staging dir is removed."""
        if self.remote:
            self.sync()
            shutil.rmtree(self.local, ignore_errors=True)
