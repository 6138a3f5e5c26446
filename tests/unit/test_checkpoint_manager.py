"""The checkpoint manager on a synthetic engine: registering in raygpt's own index only once
every rank's files are in storage, what is kept, loading every part back, and the package's
imports (checkpoint/ imports nothing from trainer/worker/)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from test_checkpoint import PATCHES, FakeEngine, LoadingEngine

from trainer.checkpoint import index
from trainer.checkpoint.manager import CheckpointManager, load_parts
from trainer.config import TrainerConfig


class Part:
    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, d):
        self.value = d["value"]


def manager(run: Path, rank: int = 0, **t) -> CheckpointManager:
    return CheckpointManager(str(run), rank, TrainerConfig(**{"keep_last": 2, **t}), PATCHES)


def test_each_save_is_registered_and_keep_last_deletes_the_oldest(tmp_path):
    m = manager(tmp_path)
    for step in (2, 4, 6):
        assert m.save(step, FakeEngine(0), {"train": Part(step)}, {"run_name": "r"}) == (
            f"checkpoint_{step:08d}"
        )
    m.close()
    assert index.read_index(str(tmp_path)) == ["checkpoint_00000004", "checkpoint_00000006"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == [
        "checkpoint_00000004",
        "checkpoint_00000006",
    ]
    state = json.loads((tmp_path / "checkpoint_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["parts"] == {"train": {"value": 6}}
    assert not list(Path("/tmp").glob(f"raygpt-ckpt-*{tmp_path.name}"))


def test_keep_every_copies_into_kept_as_hard_links(tmp_path):
    m = manager(tmp_path, keep_last=1, checkpoint_interval=2, keep_every=2)
    for step in (2, 4):
        m.save(step, FakeEngine(0), {}, {})
    kept = tmp_path / "kept" / "checkpoint_00000004"
    state = "trainer_state.json"
    # the same file under two names: no extra bytes
    assert (kept / state).stat().st_ino == (tmp_path / "checkpoint_00000004" / state).stat().st_ino
    m.save(6, FakeEngine(0), {}, {})
    m.close()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["checkpoint_00000004"]
    assert index.read_index(str(tmp_path)) == ["checkpoint_00000006"]
    assert not (tmp_path / "checkpoint_00000004").exists()  # retention deleted the original
    assert json.loads((kept / state).read_text())["step"] == 4  # the kept copy stays whole


def test_background_registration_waits_for_every_ranks_files(tmp_path):
    """Object storage saves in the background; rank 0 registers a checkpoint only once the other
    rank's integrity record is in storage, however late that rank's upload is."""
    rank0, rank1 = manager(tmp_path, rank=0), manager(tmp_path, rank=1)
    release = threading.Event()
    rank1.pause = lambda point, step: release.wait(30) if point == "upload" else None
    for m in (rank0, rank1):
        m.asynchronous = True
    saves = [
        threading.Thread(target=m.save, args=(2, FakeEngine(m.rank), {}, {"run_name": "r"}))
        for m in (rank0, rank1)
    ]
    import trainer.checkpoint.manager as mod

    original, mod._world = mod._world, lambda: 2
    try:
        for t in saves:
            t.start()
        for t in saves:
            t.join(30)
        time.sleep(0.5)
        assert index.read_index(str(tmp_path)) is None  # rank 1's files are not there yet
        assert not (tmp_path / "checkpoint_00000002" / "files" / "rank_1.json").exists()
        release.set()
        rank1.close()
        rank0.close()
    finally:
        mod._world = original
    assert index.read_index(str(tmp_path)) == ["checkpoint_00000002"]
    assert sorted(p.name for p in (tmp_path / "checkpoint_00000002" / "files").iterdir()) == [
        "rank_0.json",
        "rank_1.json",
    ]


def test_resume_loads_the_latest_and_sets_aside_newer_unregistered(tmp_path, capsys):
    m = manager(tmp_path)
    m.save(2, FakeEngine(0), {"train": Part(2), "loader": Part(16)}, {})
    m.close()
    (tmp_path / "checkpoint_00000004").mkdir()  # a worker group failed while writing it
    (tmp_path / "checkpoint_00000004" / "shard.pt").write_bytes(b"x")
    parts = {"train": Part(), "loader": Part()}
    uri, saved = manager(tmp_path).resume(LoadingEngine(), parts)
    assert Path(uri).name == "checkpoint_00000002" and saved["universal"] is False
    assert (parts["train"].value, parts["loader"].value) == (2, 16)
    assert (tmp_path / "incomplete" / "checkpoint_00000004" / "shard.pt").exists()
    assert manager(tmp_path / "new").resume(LoadingEngine(), parts) is None


def test_parts_of_checkpoints_written_before_state_parts():
    class Train(Part):
        def load_state_dict(self, d):
            self.value = d["step"]

    class Loader(Part):
        def load_state_dict(self, d):
            self.value = d["consumed_samples"]

    parts = {"train": Train(), "loader": Loader(), "guard": Part(5)}
    load_parts(parts, {"step": 7, "consumed_samples": 56})
    assert (parts["train"].value, parts["loader"].value, parts["guard"].value) == (7, 56, 5)
    load_parts(parts, {"step": 7, "consumed_samples": 56, "guard": {"value": 3}})
    assert parts["guard"].value == 3


def test_the_checkpoint_package_imports_no_worker_driver_or_ray_code():
    """Every import statement of trainer/checkpoint/ (lazy ones too); what they import in turn
    is held by tests/unit/test_config_leaf.py (trainer.config) and cluster/'s own tests."""
    from test_config_leaf import imported_names

    root = Path(__file__).resolve().parents[2]
    files = sorted((root / "trainer" / "checkpoint").glob("*.py"))
    assert {p.name for p in files} >= {"format.py", "index.py", "manager.py", "universal.py"}
    bad = [
        f"{p.name} imports {name}"
        for p in files
        for name in imported_names(p)
        if name.split(".")[0] == "ray" or name.startswith(("trainer.worker", "trainer.driver"))
    ]
    assert bad == []


@pytest.mark.parametrize("name, step", [("checkpoint_00000012", 12), ("kept", -1), ("x_1", -1)])
def test_checkpoint_names(name, step):
    assert index.step_of(name) == step
    if step >= 0:
        assert index.checkpoint_name(step) == name
