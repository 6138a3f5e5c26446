"""The ledger of one prepare: what is planned and what is done, so that a killed prepare resumes.

It lives in the prepare's build location (a storage URI: `<out_dir>.partial-<fp16>` on a local
path or shared mount, `<out_dir>/v-<fp16>/` on an object store), under `ledger/`:

- `plan.json`: the settings, their fingerprint and the work units of every task, written by
  the driver once, after listing. A rerun reads it instead of listing again, so the tasks it
  runs are the ones whose results are already recorded, cut the same way.
- `task-<k>.json`: task k's result (its shards with their sha256 and its counts), written by
  the task itself, one small object, only after every shard of the task is complete.

The tokenizer (`tokenizer.json` beside it) is written once, whole, before any task starts.
A task without a ledger entry is run (again) from its start: it writes the same shard names
with the same bytes, so whatever a killed attempt left behind is overwritten. The ledger is
removed when the prepare commits (local: before the rename; object stores: after manifest.json).
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from data_pipeline import storage

LEDGER_DIR = "ledger"
PLAN_FILE = "plan.json"
_TASK_FILE = re.compile(r"task-(\d{5,})\.json")


class Ledger:
    """Read and write the ledger under `build` (any storage URI)."""

    def __init__(self, build: str):
        self.build = build
        self.root = storage.join(build, LEDGER_DIR)

    def read_plan(self) -> Optional[dict[str, Any]]:
        """The plan written by an earlier run, or None."""
        uri = storage.join(self.root, PLAN_FILE)
        try:
            return json.loads(storage.read_text(uri)) if storage.is_file(uri) else None
        except FileNotFoundError:
            return None

    def write_plan(self, plan: dict[str, Any]) -> None:
        storage.write_text(storage.join(self.root, PLAN_FILE), json.dumps(plan, sort_keys=True))

    def record(self, task: int, result: dict[str, Any]) -> None:
        """Task `task` is done (call after its shards are complete)."""
        uri = storage.join(self.root, f"task-{task:05d}.json")
        storage.write_text(uri, json.dumps(result, sort_keys=True))

    def done(self) -> dict[int, dict[str, Any]]:
        """The results of the tasks recorded as done, by task index."""
        results: dict[int, dict[str, Any]] = {}
        for name in storage.listdir(self.root):
            m = _TASK_FILE.fullmatch(name)
            if m:
                results[int(m[1])] = json.loads(storage.read_text(storage.join(self.root, name)))
        return results

    def remove(self) -> None:
        """Deletes the ledger (nothing to do when there is none)."""
        if storage.is_dir(self.root):
            storage.delete(self.root)


def plan_settings(build: str) -> Optional[dict[str, Any]]:
    """The settings recorded in the ledger under `build`, or None when it has none."""
    plan = Ledger(build).read_plan()
    return plan.get("settings") if isinstance(plan, dict) else None
