"""Which checkpoints a run has: raygpt's own index, and the one "latest verified" rule.

A run directory (any storage URI: local path, shared mount, s3://, gs://) holds
    checkpoint_<step:08d>/   one checkpoint each (trainer/checkpoint/format.py)
    checkpoints.json         the index: the checkpoints registered, oldest first
    kept/checkpoint_<step>/  checkpoints kept for good (trainer.keep_every), never deleted
    incomplete/              checkpoint directories that were never registered, set aside

A checkpoint is registered (added to the index) only once every rank's files are in storage,
so a directory the index does not name is a half-written one. Every reader of a run asks
`latest(run_uri)`: resume (the driver's plan and a restarted worker), the guard's rollback,
export and init_from. Nothing here knows Ray; a run directory written before this index existed
(its registrations in Ray Train's snapshot file) is read through cluster/ray_private.py once
and migrated by `repair`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from data_pipeline import storage
from trainer.checkpoint.format import CheckpointError, verify_checkpoint

INDEX_FILE = "checkpoints.json"
INDEX_VERSION = 1
CHECKPOINT_PREFIX = "checkpoint_"
INCOMPLETE_DIR = "incomplete"
KEPT_DIR = "kept"


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint taken after `step` (the one naming rule)."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def step_of(name: str) -> int:
    """The step a checkpoint directory name stands for (-1 when it is not one)."""
    suffix = storage.name(name)[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else -1


def checkpoint_dirs(run_uri: str) -> list[str]:
    """Names of the checkpoint_* directories in the run directory, oldest step first."""
    names = [n for n in storage.listdir(run_uri) if n.startswith(CHECKPOINT_PREFIX)]
    return sorted((n for n in names if storage.is_dir(storage.join(run_uri, n))), key=step_of)


def complete_checkpoints(run_uri: str) -> list[str]:
    """Names of the checkpoint directories of `run_uri` that verify, oldest first."""
    out = []
    for n in checkpoint_dirs(run_uri):
        try:
            verify_checkpoint(storage.join(run_uri, n))
            out.append(n)
        except CheckpointError:
            pass
    return out


# -- the index ------------------------------------------------------------------------------


def read_index(run_uri: str) -> Optional[list[str]]:
    """The registered checkpoint names, oldest first, or None when the run has no index.

    Raises CheckpointError (one line) for an index that exists but cannot be read: it is
    written whole (a rename locally, one object on a store), so that is damage, not a race."""
    uri = storage.join(run_uri, INDEX_FILE)
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        names = [str(e["name"]) for e in data["checkpoints"]]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{uri}: unreadable checkpoint index ({e})") from None
    return names


def write_index(run_uri: str, names: list[str]) -> None:
    """Writes the index whole (never half a file: storage.write_text)."""
    entries = [{"name": n, "step": step_of(n)} for n in names]
    text = json.dumps({"version": INDEX_VERSION, "checkpoints": entries}, indent=1) + "\n"
    storage.write_text(storage.join(run_uri, INDEX_FILE), text)


def legacy_registered(run_uri: str) -> Optional[list[str]]:
    """Registrations of a run written before raygpt's index: the checkpoints Ray Train's
    snapshot file names (its complete checkpoints when that file is unreadable), or None when
    there is no such file."""
    from cluster.ray_private import SNAPSHOT_FILE, snapshot_checkpoints

    uri = storage.join(run_uri, SNAPSHOT_FILE)
    try:
        names, latest_name = snapshot_checkpoints(storage.read_text(uri))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return complete_checkpoints(run_uri)  # a kill while Ray rewrote it
    if latest_name is None:
        return []  # Ray started such a run from scratch
    # Ray resumed its latest, which need not be the highest step
    return [n for n in names or [] if n != latest_name] + [latest_name]


def registered(run_uri: str) -> list[str]:
    """The run's registered checkpoints, oldest first ([] for a new run)."""
    names = read_index(run_uri)
    if names is None:
        names = legacy_registered(run_uri)
    return names or []


# -- the one rule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Latest:
    """The newest registered checkpoint that verifies (uri None: there is none), and the newer
    registered ones that did not, each (uri, one-line problem)."""

    uri: Optional[str]
    damaged: list[tuple[str, str]] = field(default_factory=list)

    @property
    def name(self) -> Optional[str]:
        return storage.name(self.uri) if self.uri else None


def latest(run_uri: str, *, hashes: bool = True) -> Latest:
    """The latest verified checkpoint of a run: walking the registered checkpoints newest
    first, the first that passes verify_checkpoint (sizes, and sha256 with `hashes`). What the
    caller does about skipped damaged ones is its own policy: resume refuses, export says so."""
    damaged: list[tuple[str, str]] = []
    for name in reversed(registered(run_uri)):
        uri = storage.join(run_uri, name)
        try:
            verify_checkpoint(uri, hashes=hashes)
        except CheckpointError as e:
            damaged.append((uri, str(e)))
            continue
        return Latest(uri, damaged)
    return Latest(None, damaged)


# -- making the run directory agree with the index -------------------------------------------


def repair(run_uri: str, *, echo: bool = True) -> list[str]:
    """Before training starts: a run without an index gets one (from Ray Train's snapshot file
    of a run written by an older raygpt, else empty), and checkpoint directories the index does
    not register (a run stopped while writing one) are moved into incomplete/, not deleted.
    Returns the URIs they were moved to."""
    names = read_index(run_uri)
    if names is None:
        legacy = legacy_registered(run_uri)
        if legacy is None and not checkpoint_dirs(run_uri):
            return []  # a new run: nothing to index yet
        names = legacy or []
        write_index(run_uri, names)
        if echo and legacy is not None:
            print(f"resume: indexed {len(names)} checkpoints of an earlier raygpt in {INDEX_FILE}")
    return set_aside_unregistered(run_uri, names, echo=echo)


def set_aside_unregistered(
    run_uri: str, keep: list[str], *, after: int = -1, echo: bool = True
) -> list[str]:
    """Moves checkpoint_* directories not in `keep` (and newer than step `after`) into
    run_dir/incomplete/. Such a directory holds some ranks' files of a checkpoint that was never
    registered; left in place, a resumed run would later write the same name on top of it."""
    moved = []
    taken = set(storage.listdir(storage.join(run_uri, INCOMPLETE_DIR)))
    for n in checkpoint_dirs(run_uri):
        if n in keep or step_of(n) <= after:
            continue
        dest, k = n, 1
        while dest in taken:
            dest, k = f"{n}.{k}", k + 1
        taken.add(dest)
        storage.move(storage.join(run_uri, n), storage.join(run_uri, INCOMPLETE_DIR, dest))
        moved.append(storage.join(run_uri, INCOMPLETE_DIR, dest))
        if echo:
            print(
                f"resume: {n} was never completed (the run stopped while writing it); "
                f"moved to {INCOMPLETE_DIR}/{dest}"
            )
    return moved
