"""One rule for "the latest verified checkpoint" of a run, used by resume, guard rollback and
export, on any storage URI (local path, shared mount, s3://, gs://).

Running the same run.name again makes Ray Train hand every worker the latest checkpoint it
registered in its snapshot file (cluster/ray_private.py knows that file). `resume_point`
finds that checkpoint and verifies it; `repair` makes the run directory agree with it before
Ray starts: an unreadable snapshot is rebuilt from the complete checkpoints, and checkpoint
directories Ray never registered (a run killed while writing one) are set aside, not deleted.
"""

from __future__ import annotations

from typing import Optional

from cluster.ray_private import SNAPSHOT_FILE, rebuild_snapshot, snapshot_checkpoints
from data_pipeline import storage
from trainer.checkpoint.format import CheckpointError, verify_checkpoint

CHECKPOINT_PREFIX = "checkpoint_"
INCOMPLETE_DIR = "incomplete"


def step_of(name: str) -> int:
    suffix = storage.name(name)[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if suffix.isdigit() else -1


def checkpoint_dirs(run_uri: str) -> list[str]:
    """Names of the checkpoint_* directories in the run directory, oldest step first."""
    names = [n for n in storage.listdir(run_uri) if n.startswith(CHECKPOINT_PREFIX)]
    return sorted((n for n in names if storage.is_dir(storage.join(run_uri, n))), key=step_of)


def complete_checkpoints(run_uri: str) -> list[str]:
    """Names of the checkpoints of `run_uri` that pass verify_checkpoint, oldest first."""
    out = []
    for n in checkpoint_dirs(run_uri):
        try:
            verify_checkpoint(storage.join(run_uri, n))
            out.append(n)
        except CheckpointError:
            pass
    return out


def registered(run_uri: str) -> Optional[tuple[Optional[list[str]], Optional[str]]]:
    """(registered names, latest name) from Ray's snapshot; None when there is no readable one."""
    try:
        return snapshot_checkpoints(storage.read_text(storage.join(run_uri, SNAPSHOT_FILE)))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None


def resume_point(run_uri: str) -> Optional[str]:
    """URI of the checkpoint Ray Train will resume `run_uri` from, or None (a fresh start).

    Ray's snapshot names it; with an unreadable snapshot (a kill while Ray rewrote it) the
    newest complete checkpoint is taken, and `repair` makes Ray agree before it starts.
    """
    if not storage.exists(storage.join(run_uri, SNAPSHOT_FILE)):
        return None
    reg = registered(run_uri)
    if reg is not None:
        return storage.join(run_uri, reg[1]) if reg[1] else None
    complete = complete_checkpoints(run_uri)
    return storage.join(run_uri, complete[-1]) if complete else None


def latest_verified(run_uri: str) -> Optional[str]:
    """The newest checkpoint of a run that passes verification: the resume point when it is
    intact, else the newest complete checkpoint (export and rollback use this rule too)."""
    point = resume_point(run_uri)
    if point is not None:
        try:
            verify_checkpoint(point)
            return point
        except CheckpointError:
            pass
    complete = complete_checkpoints(run_uri)
    return storage.join(run_uri, complete[-1]) if complete else None


def repair(run_uri: str, *, echo: bool = True) -> None:
    """Before Ray starts: rebuild an unreadable snapshot, set aside unregistered checkpoints."""
    repair_snapshot(run_uri, echo=echo)
    set_aside_unregistered(run_uri, echo=echo)


def repair_snapshot(run_uri: str, *, echo: bool = True) -> Optional[str]:
    """Rewrites an unreadable snapshot from the complete checkpoints (the damaged file is kept
    beside it as .corrupt). Ray writes the snapshot in place, so a driver killed at that moment
    leaves it truncated, and Ray would refuse to start. Returns the kept copy's URI, or None
    when the snapshot was fine (or absent)."""
    snapshot = storage.join(run_uri, SNAPSHOT_FILE)
    reg = registered(run_uri)
    if not storage.exists(snapshot) or (reg is not None and reg[0] is not None):
        return None
    complete = complete_checkpoints(run_uri)
    kept = storage.join(run_uri, f"{SNAPSHOT_FILE}.corrupt")
    storage.move(snapshot, kept)
    storage.write_text(snapshot, rebuild_snapshot([(n, step_of(n)) for n in complete]))
    if echo:
        print(
            f"resume: {SNAPSHOT_FILE} was unreadable (kept as {storage.name(kept)}); rebuilt "
            f"from {len(complete)} complete checkpoints, latest {complete[-1] if complete else 'none'}"
        )
    return kept


def set_aside_unregistered(run_uri: str, *, echo: bool = True) -> list[str]:
    """Moves checkpoint_* directories that Ray never registered into run_dir/incomplete/.

    Such a directory is what a run killed while writing a checkpoint leaves behind (some ranks'
    shards, no registration). Ray resumes from its snapshot and ignores it, but the resumed run
    would later write the same directory name on top of the leftovers. Nothing is deleted.
    Without a snapshot file no checkpoint was ever registered, so every checkpoint_* goes.
    """
    snapshot_exists = storage.exists(storage.join(run_uri, SNAPSHOT_FILE))
    reg = registered(run_uri)
    if snapshot_exists and (reg is None or reg[0] is None):
        return []  # unreadable snapshot: touch nothing (the resume check reports it)
    keep = set(reg[0]) if reg else set()
    moved = []
    taken = set(storage.listdir(storage.join(run_uri, INCOMPLETE_DIR)))
    for n in checkpoint_dirs(run_uri):
        if n in keep:
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
