"""Everything raygpt knows about Ray's internals, in one module: the checkpoint snapshot file
Ray Train keeps in a run directory, the autoscaler's limits, Ray Train's per-report logger and
its storage hook for uploading a checkpoint. A Ray upgrade that changes these breaks here only.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

# Ray Train V2 keeps the checkpoints it registered here, in the run directory.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def snapshot_checkpoints(text: str) -> tuple[Optional[list[str]], Optional[str]]:
    """(registered checkpoint dir names or None if it lists none, the latest one or None)
    from the snapshot's text. Raises ValueError when the text is not a readable snapshot."""
    try:
        snap = json.loads(text)
        latest = snap["latest_checkpoint_result"]
        latest = str(latest["checkpoint_dir_name"]) if latest else None
        results = snap.get("checkpoint_results")
        names = None if results is None else [str(r["checkpoint_dir_name"]) for r in results]
        return names, latest
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable {SNAPSHOT_FILE}: {e}") from None


def rebuild_snapshot(checkpoints: list[tuple[str, int]]) -> str:
    """A snapshot registering `checkpoints` ((dir name, step), oldest first), as Ray writes it."""
    import ray

    entries = [
        {"version": 0, "checkpoint_dir_name": name, "metrics": {"step": step}}
        for name, step in checkpoints
    ]
    state = {
        "ray_version": ray.__version__,
        "checkpoint_results": entries,
        "checkpoint_report_indices": list(range(len(entries))),
        "latest_checkpoint_result": entries[-1] if entries else None,
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": len(entries),
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    return json.dumps(state, indent=1) + "\n"


def current_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def max_resources() -> Optional[dict[str, float]]:
    """What an autoscaling cluster can grow to (CPU, GPU), or None without an autoscaler."""
    return None


def quiet_train_logs() -> None:
    """Ray Train logs every report ("Reporting training result ...") at INFO under a logger
    named after its file, which RunConfig's LoggingConfig does not reach."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train version: its logging stays as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def upload_fn_with_hook(before_upload: Callable[[], None]) -> Callable[[Any, str], Any]:
    """A checkpoint_upload_fn for ray.train.report that runs `before_upload` first (drills)."""
    import ray.train

    def upload(ckpt: Any, dir_name: str) -> Any:
        before_upload()
        storage = ray.train.get_context().get_storage()
        return storage.persist_current_checkpoint(ckpt, dir_name)

    return upload
