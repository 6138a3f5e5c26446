"""The checkpoint manager: when to save, writing (in the background on every storage),
registering, what to keep, and loading back every state part.

One checkpoint is saved in four moves, the same on Ray Train workers and in-process:
1. every rank snapshots its share (format.py's save_local): DeepSpeed's state files serialized
   into memory, RNG and rank 0's trainer state (every part's state_dict) into a local temporary
   directory; this is all the step loop waits for (and for the previous checkpoint to finish);
2. on a background thread, every rank writes and hashes the snapshot (its integrity record),
   then moves (local storage) or uploads (s3://, gs://) its files into
   `<run>/checkpoint_<step>/`, its integrity record last;
3. rank 0 registers the checkpoint in the run's index (trainer/checkpoint/index.py) once it
   sees every rank's record in storage (synchronous saves, bench/'s baseline: after a barrier);
4. rank 0 deletes the oldest registered checkpoints beyond trainer.keep_last (after the index no
   longer names them) and copies every keep_every-th one into kept/.

Resume, a restarted worker and the guard's rollback all load `index.latest`. Ray moves no
checkpoint files and knows no checkpoint names.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from data_pipeline import storage
from trainer.checkpoint import format as fmt
from trainer.checkpoint import index
from trainer.config import TrainerConfig

REGISTER_TIMEOUT_S = 1800.0  # rank 0 waits this long for the other ranks' background uploads


class CheckpointPolicy:
    """When to save (TrainerConfig): every `checkpoint_interval` steps, whenever
    `checkpoint_every_minutes` passed since the last save, at a stop, and at the last step of
    the invocation; every `keep_every`-th interval checkpoint is also kept for good."""

    def __init__(self, t: TrainerConfig, clock: Callable[[], float] = time.monotonic):
        self.interval = t.checkpoint_interval
        self.every_s = t.checkpoint_every_minutes * 60 if t.checkpoint_every_minutes else None
        self.keep_every = t.keep_every
        self.clock = clock
        self.last_save = clock()

    def time_due(self) -> bool:
        return self.every_s is not None and self.clock() - self.last_save >= self.every_s

    def reason(self, step: int, *, last: bool, time_due: bool, stop: bool) -> Optional[str]:
        """Why `step` is checkpointed (None: it is not)."""
        if last:
            return "final"
        if stop:
            return "stop"
        if self.interval and step % self.interval == 0:
            return "interval"
        return "time" if time_due else None

    def saved(self) -> None:
        self.last_save = self.clock()

    def keep_for_good(self, step: int) -> bool:
        return (
            bool(self.keep_every and self.interval)
            and step % (self.keep_every * self.interval) == 0
        )


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class CheckpointManager:
    """One worker's checkpoints of the run at `run_uri`.

    parts: name -> an object with state_dict()/load_state_dict() (the trainer state, the
    loader's position, the guard); the engine and the RNG are saved as files beside them.
    universal: {"checkpoint": name, "dir": uri} when the driver converted the checkpoint this
    run resumes from for another layout (trainer/checkpoint/universal.py).
    pause(point, step): a fault-drill hook, called at "save" (files written locally) and at
    "upload" (before this rank's files go to storage).
    """

    def __init__(
        self,
        run_uri: str,
        rank: int,
        t: TrainerConfig,
        patches: fmt.EnginePatches,
        *,
        universal: Optional[dict[str, str]] = None,
        pause: Optional[Callable[[str, int], None]] = None,
    ):
        self.run_uri, self.rank, self.patches = run_uri, rank, patches
        self.keep_last = t.keep_last
        self.policy = CheckpointPolicy(t)
        self.universal = universal or {}
        self.pause = pause or (lambda point, step: None)
        self.asynchronous = True  # the step loop waits for a snapshot only (bench/: False)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
        self._pending: list[Future[None]] = []

    # -- loading ------------------------------------------------------------------------------
    def resume(self, engine: Any, parts: dict[str, Any]) -> Optional[tuple[str, dict[str, Any]]]:
        """Loads the run's latest verified checkpoint into `engine` and `parts`: (its URI, its
        trainer state, see `load`), or None for a fresh start. Rank 0 first sets aside the
        directories newer than it that were never registered (a worker group that failed while
        writing one)."""
        found = index.latest(self.run_uri, hashes=False)
        if self.rank == 0:
            after = index.step_of(found.name) if found.name else -1
            index.set_aside_unregistered(self.run_uri, index.registered(self.run_uri), after=after)
        _barrier()
        if found.uri is None:
            return None
        return found.uri, self.load(found.uri, engine, parts)

    def load(self, uri: str, engine: Any, parts: dict[str, Any]) -> dict[str, Any]:
        """Engine, RNG and every part from the checkpoint at `uri`; returns its trainer state
        (with "universal": True when it was loaded from the driver's converted copy)."""
        name = storage.name(uri)
        uni = self.universal.get("dir") if name == self.universal.get("checkpoint") else None
        with storage.local_copy(uri) as local, _local_or_none(uni) as uni_dir:
            saved = fmt.load(engine, local, self.rank, self.patches, universal_dir=uni_dir)
        load_parts(parts, saved)
        return {**saved, "universal": uni is not None}

    def rollback_point(self) -> Optional[str]:
        """The checkpoint a rollback goes back to: the latest verified one, once every save in
        flight is registered (None: there is none)."""
        self.wait()
        _barrier()  # rank 0's registration of every rank's files is in the index
        return index.latest(self.run_uri, hashes=False).uri

    # -- saving -------------------------------------------------------------------------------
    def save(self, step: int, engine: Any, parts: dict[str, Any], extra: dict[str, Any]) -> str:
        """Takes checkpoint_<step> (every rank calls it at the same step); returns its name.
        extra: what else rank 0's trainer_state.json records (run name, config).

        The step loop waits for the previous checkpoint to be finished, then for a snapshot of
        this one in memory; with `asynchronous` (the default) writing, hashing, uploading and
        registering run on this rank's background thread while training goes on."""
        self.wait()  # one checkpoint in flight at a time (and its failure surfaces here)
        name = index.checkpoint_name(step)
        state = {
            "step": step,
            **extra,
            "parts": {k: part.state_dict() for k, part in parts.items()},
        }
        local = fmt.save_local(engine, self.rank, state, self.patches)
        self.pause("save", step)
        world = _world()
        if self.asynchronous:
            self._pending.append(self._pool.submit(self._finish, local, name, world))
        else:
            self._persist(local, name)
            _barrier()  # every rank's files are in the run directory
            if self.rank == 0:
                self._register(name)
        self.policy.saved()
        if self.policy.keep_for_good(step):
            self.wait()
            _barrier()
            if self.rank == 0:
                keep_for_good(self.run_uri, name)
        return name

    def _finish(self, local: fmt.LocalSave, name: str, world: int) -> None:
        """In the background: write, hash and persist this rank's files; rank 0 then registers
        the checkpoint once every rank's are in storage."""
        self._persist(local, name)
        if self.rank == 0:
            self._await_records(name, world)
            self._register(name)

    def _persist(self, local: fmt.LocalSave, name: str) -> None:
        """This rank's files (written and hashed first) into <run>/<name>, its integrity record
        last."""
        self.pause("upload", index.step_of(name))
        dest = storage.join(self.run_uri, name)
        try:
            root = local.finish()
            record = Path(fmt.FILES_DIR) / f"rank_{self.rank}.json"
            files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
            for rel in [f for f in files if f != record] + [record]:
                _put(root / rel, storage.join(dest, rel.as_posix()))
        finally:
            shutil.rmtree(local.dir, ignore_errors=True)

    def _await_records(self, name: str, world: int) -> None:
        """Rank 0, in the background: waits until every rank's integrity record of `name` is in
        storage (each rank writes its record after its other files)."""
        want = {f"{fmt.FILES_DIR}/rank_{r}.json" for r in range(world)}
        dest, wait, deadline = (
            storage.join(self.run_uri, name),
            0.05,
            time.monotonic() + REGISTER_TIMEOUT_S,
        )
        while not want <= set(storage.walk_files(dest)):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{name}: not every rank's files reached {dest} within "
                    f"{REGISTER_TIMEOUT_S:.0f} s; it stays unregistered"
                )
            time.sleep(wait)
            wait = min(wait * 2, 2.0)

    def _register(self, name: str) -> None:
        """Rank 0: adds `name` to the index, then deletes the oldest beyond keep_last."""
        fmt.verify_checkpoint(storage.join(self.run_uri, name), hashes=False)
        names = [n for n in index.registered(self.run_uri) if n != name] + [name]
        drop = names[: max(0, len(names) - self.keep_last)] if self.keep_last > 0 else []
        index.write_index(self.run_uri, names[len(drop) :])
        for old in drop:
            storage.delete(storage.join(self.run_uri, old))

    def wait(self) -> None:
        """Every checkpoint this rank saved so far is persisted (and, on rank 0, registered);
        a failure of one is raised here."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def load_parts(parts: dict[str, Any], saved: dict[str, Any]) -> None:
    """Each part's state from a trainer state, including those written before state parts
    existed (step, consumed_samples and guard at the top level)."""
    for name, part in parts.items():
        if name in saved.get("parts", {}):
            part.load_state_dict(saved["parts"][name])
        elif name == "train":
            part.load_state_dict(saved)
        elif name == "loader":
            part.load_state_dict({"consumed_samples": int(saved["consumed_samples"])})
        elif name == "guard" and saved.get("guard"):
            part.load_state_dict(saved["guard"])


def _put(src: Path, dest: str) -> None:
    """One local file into storage: a rename on the same local filesystem, else a copy."""
    if storage.is_remote(dest):
        storage.upload(src, dest)
        return
    target = Path(storage.filesystem(dest)[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, target)
    except OSError:  # another filesystem
        shutil.copyfile(src, target)


def keep_for_good(run_uri: str, name: str) -> Optional[Path]:
    """Copies the registered checkpoint <run>/<name> to <run>/kept/<name>, which retention never
    deletes. On a local or shared filesystem the copy is hard links (no extra bytes); elsewhere
    (s3://...) the files are copied. Returns the local copy (None on object storage)."""
    if storage.is_remote(run_uri):
        storage.copy_tree(storage.join(run_uri, name), storage.join(run_uri, index.KEPT_DIR, name))
        return None
    run_dir = Path(storage.filesystem(run_uri)[1])
    src, dest = run_dir / name, run_dir / index.KEPT_DIR / name
    if dest.exists():
        return dest
    tmp = dest.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    os.replace(tmp, dest)
    return dest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _local_or_none(uri: Optional[str]) -> Iterator[Optional[Path]]:
    if uri is None:
        yield None
        return
    with storage.local_copy(uri) as local:
        yield local
