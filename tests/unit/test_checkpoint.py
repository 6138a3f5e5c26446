"""Checkpoint integrity records and the resume compatibility rules, on synthetic directories."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hostile import RunsCodeOnLoad
from procs import tree_digest as digest

from cluster.ray_private import SNAPSHOT_FILE
from trainer.checkpoint import format as checkpoint
from trainer.checkpoint import index
from trainer.checkpoint.compat import LAYOUT_FIELDS, check_resume_compatible, compare_configs
from trainer.checkpoint.format import CheckpointError, verify_checkpoint
from trainer.config import ConfigError, load_config
from trainer.worker.ds_patches import ENGINE_PATCHES as PATCHES

ROOT = Path(__file__).resolve().parents[2]
MODEL_SHAPE_FIELDS = (
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_kv_head",
    "d_model",
    "d_ff",
    "pos_embedding",
    "norm",
    "mlp",
    "bias",
    "tie_embeddings",
)


def find_resume_checkpoint(run_dir: Path):
    found = index.latest(str(run_dir)).uri
    return Path(found) if found else None


class TorchSaves:
    """DeepSpeed's TorchCheckpointEngine: save is a torch.save."""

    zipfile_serialization = True

    def save(self, state_dict, path):
        torch.save(state_dict, path)


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint writes for one rank, as DeepSpeed does: the
    state files through its checkpoint engine, `latest` (rank 0) directly."""

    def __init__(self, rank: int):
        self.rank = rank
        self.checkpoint_engine = TorchSaves()
        self.weights = torch.arange(1000.0) + rank

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        # the live training state (a view shares its tensor's storage)
        self.state = {"w": self.weights, "view": self.weights[10:20]}
        self.checkpoint_engine.save(self.state, str(d / f"zero_pp_rank_{self.rank}.pt"))
        if self.rank == 0:
            self.checkpoint_engine.save(
                {"module": torch.ones(50)}, d / "mp_rank_00_model_states.pt"
            )
            (Path(save_dir) / "latest").write_text(tag)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return load_config(
        [
            "+experiment=smoke",
            f"run.root={root}",
            "run.name=r",
            f"data.out_dir={root / 'no-data'}",
        ]
    )


def make_checkpoint(dest: Path, state: dict, world: int = 2) -> Path:
    """Each rank saves into its own local dir (save_local); the dirs are merged, as Ray does."""
    dest.mkdir(parents=True)
    for rank in range(world):
        local = checkpoint.save_local(FakeEngine(rank), rank, state, PATCHES).finish()
        shutil.copytree(local, dest, dirs_exist_ok=True)
        shutil.rmtree(local)
    return dest


@pytest.fixture
def ckpt(tmp_path, cfg) -> Path:
    state = {"step": 10, "consumed_samples": 80, "wandb_id": "abc", "config": cfg.to_dict()}
    return make_checkpoint(tmp_path / "checkpoint_00000010", state)


# ------------------------------------------------------------------------- integrity


def test_the_state_files_are_a_snapshot_in_memory_until_finished(tmp_path):
    """The step loop waits for save_local only: DeepSpeed's state files are snapshotted in
    memory and written by finish(), byte for byte the files DeepSpeed writes, whatever the
    training did to the tensors in between."""
    engine = FakeEngine(0)
    engine.save_checkpoint(str(tmp_path / "direct"), "ds")  # what DeepSpeed itself writes
    local = checkpoint.save_local(engine, 0, {"step": 3}, PATCHES)
    zero = local.dir / "ds" / "ds" / "zero_pp_rank_0.pt"
    assert not zero.exists() and (local.dir / "ds" / "latest").is_file()
    assert (local.dir / "trainer_state.json").is_file() and (local.dir / "rng/rank_0.pt").is_file()
    assert engine.checkpoint_engine.save.__func__ is TorchSaves.save  # restored after the save
    engine.state["w"].add_(1.0)  # the next steps change the live tensors
    local.finish()
    for name in ("zero_pp_rank_0.pt", "mp_rank_00_model_states.pt"):
        direct = (tmp_path / "direct" / "ds" / name).read_bytes()
        assert (local.dir / "ds" / "ds" / name).read_bytes() == direct, name
    loaded = torch.load(zero, weights_only=True)
    assert loaded["view"].untyped_storage().data_ptr() == loaded["w"].untyped_storage().data_ptr()
    record = json.loads((local.dir / "files" / "rank_0.json").read_text())["files"]
    assert (
        record["ds/ds/zero_pp_rank_0.pt"]["sha256"] == hashlib.sha256(zero.read_bytes()).hexdigest()
    )
    verify_checkpoint(local.dir)
    shutil.rmtree(local.dir)


def test_a_host_snapshot_copies_tensors_keeps_sharing_and_types():
    from trainer.worker.ds_patches import host_snapshot

    w = torch.nn.Parameter(torch.arange(6.0))
    state = OrderedDict(w=w, view=w.detach()[2:4], groups=[{"lr": 0.1, "params": (0, 1)}], n=3)
    snap = host_snapshot(state)
    assert type(snap) is OrderedDict and list(snap) == list(state)
    assert isinstance(snap["w"], torch.nn.Parameter) and snap["w"].requires_grad
    assert snap["view"].untyped_storage().data_ptr() == snap["w"].untyped_storage().data_ptr()
    assert snap["view"].untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
    with torch.no_grad():
        w.add_(10.0)
    state["groups"][0]["lr"] = 0.5
    assert snap["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and snap["view"].tolist() == [
        2.0,
        3.0,
    ]
    assert snap["groups"] == [{"lr": 0.1, "params": (0, 1)}] and snap["n"] == 3


def test_save_local_records_every_file_of_each_rank(ckpt):
    rec0 = json.loads((ckpt / "files" / "rank_0.json").read_text())["files"]
    rec1 = json.loads((ckpt / "files" / "rank_1.json").read_text())["files"]
    assert set(rec0) == {
        "ds/ds/zero_pp_rank_0.pt",
        "ds/ds/mp_rank_00_model_states.pt",
        "ds/latest",
        "rng/rank_0.pt",
        "trainer_state.json",
    }
    assert set(rec1) == {"ds/ds/zero_pp_rank_1.pt", "rng/rank_1.pt"}
    meta = rec1["rng/rank_1.pt"]
    data = (ckpt / "rng" / "rank_1.pt").read_bytes()
    assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state = checkpoint.read_trainer_state(ckpt)
    assert state["step"] == 10 and state["integrity"] == {"world_size": 2}
    verify_checkpoint(ckpt)


def test_truncated_file_is_named_with_both_sizes(ckpt):
    f = ckpt / "ds" / "ds" / "zero_pp_rank_1.pt"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[: size // 2])
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(ckpt)
    msg = str(e.value)
    assert str(f) in msg and f"truncated: expected {size} bytes, found {size // 2}" in msg
    assert "\n" not in msg


def test_missing_file_is_named(ckpt):
    (ckpt / "rng" / "rank_0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rng/rank_0\.pt: missing"):
        verify_checkpoint(ckpt)


def test_same_size_other_bytes_is_a_hash_mismatch(ckpt):
    f = ckpt / "ds" / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: hash mismatch"):
        verify_checkpoint(ckpt)
    verify_checkpoint(ckpt, hashes=False)  # sizes alone cannot see it


def test_missing_rank_record_is_named(ckpt):
    (ckpt / "files" / "rank_1.json").unlink()
    with pytest.raises(CheckpointError, match=r"files/rank_1\.json: missing"):
        verify_checkpoint(ckpt)


@pytest.mark.parametrize(
    "content, problem",
    [(None, "trainer_state.json: missing"), ('{"step": 3', "trainer_state.json: not valid JSON")],
)
def test_bad_trainer_state(ckpt, content, problem):
    f = ckpt / "trainer_state.json"
    if content is None:
        f.unlink()
    else:
        f.write_text(content)
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(ckpt)
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_without_records_is_checked_for_its_state_only(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"step": 10}')
    verify_checkpoint(tmp_path)  # written before integrity records existed
    (tmp_path / "trainer_state.json").write_text("[]")
    with pytest.raises(CheckpointError, match="not a trainer state"):
        verify_checkpoint(tmp_path)


def test_load_refuses_a_truncated_checkpoint_before_deepspeed(ckpt):
    class Engine:
        def load_checkpoint(self, *a, **k):
            raise AssertionError("DeepSpeed must not be reached")

    f = ckpt / "rng" / "rank_1.pt"
    f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(Engine(), ckpt, 1, PATCHES)


class CheckpointEngine:
    """DeepSpeed's TorchCheckpointEngine.load: torch.load(weights_only=False)."""

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)


class LoadingEngine:
    """Loads its model-state file through its checkpoint engine, as DeepSpeed's does."""

    def __init__(self):
        self.checkpoint_engine = CheckpointEngine()
        self.loaded = None

    def load_checkpoint(self, load_dir, tag, **kwargs):
        path = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        self.loaded = self.checkpoint_engine.load(path, map_location="cpu")
        return str(path), {}


def test_resume_loads_deepspeed_files_with_weights_only(ckpt, tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    engine = LoadingEngine()
    model_file = ckpt / "ds" / "ds" / "mp_rank_00_model_states.pt"
    torch.save({"module": torch.ones(3), "scaler": LossScaler(1.0)}, model_file)
    checkpoint.write_file_record(ckpt, 0)  # a legitimate rewrite: records match again
    checkpoint.load(engine, ckpt, 0, PATCHES)
    assert torch.equal(engine.loaded["module"], torch.ones(3))
    assert isinstance(engine.checkpoint_engine.load.__self__, CheckpointEngine)  # restored

    marker = tmp_path / "marker"
    torch.save({"module": torch.ones(3), "x": RunsCodeOnLoad(marker)}, model_file)
    checkpoint.write_file_record(ckpt, 0)
    with pytest.raises(CheckpointError, match=r"refusing to load .*_run_on_load") as e:
        checkpoint.load(engine, ckpt, 0, PATCHES)
    assert not marker.exists() and "\n" not in str(e.value)
    torch.load(model_file, weights_only=False)  # the file really is hostile
    assert marker.read_text() == "code ran"


# ------------------------------------------------------------------ which checkpoint


def test_a_run_of_an_earlier_raygpt_resumes_what_ray_registered_even_when_not_the_highest(
    tmp_path,
):
    for step in (2, 4):
        (tmp_path / f"checkpoint_{step:08d}").mkdir()
        (tmp_path / f"checkpoint_{step:08d}" / "trainer_state.json").write_text('{"step": 1}')
    snap = {"ray_version": "2.60.0", "latest_checkpoint_result": None}
    snap["latest_checkpoint_result"] = {"version": 0, "checkpoint_dir_name": "checkpoint_00000002"}
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps(snap))
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint_00000002"
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps({**snap, "latest_checkpoint_result": None}))
    assert find_resume_checkpoint(tmp_path) is None  # Ray started such a run from scratch
    (tmp_path / SNAPSHOT_FILE).write_text("{not json")
    # unreadable: its complete checkpoints count (these have no integrity records: complete)
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint_00000004"


def test_the_snapshot_ray_wrote_is_migrated_into_the_index(tmp_path, cfg):
    """A snapshot file as Ray Train 2.60 wrote it (2 workers, checkpoints at steps 2 and 4,
    kept from a run of 2026-12-07): repair indexes both, the latest last."""
    shutil.copy(
        ROOT / "tests/fixtures/ray_written_snapshot_2026-12-07.json", tmp_path / SNAPSHOT_FILE
    )
    state = {"step": 2, "consumed_samples": 16, "config": cfg.to_dict()}
    for step in (2, 4, 6):
        make_checkpoint(tmp_path / f"checkpoint_{step:08d}", {**state, "step": step})
    assert index.read_index(str(tmp_path)) is None
    moved = index.repair(str(tmp_path), echo=False)
    assert index.read_index(str(tmp_path)) == ["checkpoint_00000002", "checkpoint_00000004"]
    assert [Path(p).name for p in moved] == ["checkpoint_00000006"]  # Ray never registered it
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint_00000004"
    (tmp_path / SNAPSHOT_FILE).write_text("{not json")  # the index decides from now on
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint_00000004"


def test_a_truncated_snapshot_is_indexed_from_the_complete_checkpoints(tmp_path, cfg):
    state = {"step": 2, "consumed_samples": 16, "config": cfg.to_dict()}
    for step in (2, 4, 6):
        make_checkpoint(tmp_path / f"checkpoint_{step:08d}", {**state, "step": step})
    (tmp_path / "checkpoint_00000006" / "files" / "rank_0.json").unlink()  # half-written
    (tmp_path / SNAPSHOT_FILE).write_text('{"ray_version": "2.6')  # killed mid-rewrite
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint_00000004"
    moved = [Path(p) for p in index.repair(str(tmp_path), echo=False)]
    assert [p.name for p in moved] == ["checkpoint_00000006"]
    assert index.read_index(str(tmp_path)) == ["checkpoint_00000002", "checkpoint_00000004"]
    assert (tmp_path / SNAPSHOT_FILE).read_text() == '{"ray_version": "2.6'  # left as it was


def test_without_an_index_nothing_was_registered_and_leftovers_are_set_aside(tmp_path):
    assert find_resume_checkpoint(tmp_path / "nope") is None
    for name in ("checkpoint_00000009", "checkpoint_00000010"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard.pt").write_bytes(b"x")
    assert find_resume_checkpoint(tmp_path) is None  # a fresh start
    moved = [Path(p) for p in index.repair(str(tmp_path), echo=False)]
    assert [p.name for p in moved] == ["checkpoint_00000009", "checkpoint_00000010"]
    assert not list(tmp_path.glob("checkpoint_*"))
    assert (tmp_path / "incomplete" / "checkpoint_00000010" / "shard.pt").read_bytes() == b"x"
    assert index.read_index(str(tmp_path)) == []


def test_only_unregistered_checkpoints_are_set_aside(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint_{step:08d}").mkdir()
    (tmp_path / "incomplete" / "checkpoint_00000006").mkdir(parents=True)  # an earlier one
    index.write_index(str(tmp_path), ["checkpoint_00000002", "checkpoint_00000004"])
    moved = [Path(p) for p in index.repair(str(tmp_path), echo=False)]
    assert moved == [tmp_path / "incomplete" / "checkpoint_00000006.1"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_0*")) == [
        "checkpoint_00000002",
        "checkpoint_00000004",
    ]
    (tmp_path / "checkpoint_00000008").mkdir()  # newer than the latest: a restarted worker's
    moved = index.set_aside_unregistered(
        str(tmp_path), index.registered(str(tmp_path)), after=4, echo=False
    )
    assert [Path(p).name for p in moved] == ["checkpoint_00000008"]


def test_an_unreadable_index_is_one_line_naming_it(tmp_path):
    (tmp_path / index.INDEX_FILE).write_text('{"checkpoints": [{"nam')
    with pytest.raises(CheckpointError, match=r"checkpoints.json: unreadable checkpoint index"):
        index.latest(str(tmp_path))


def test_latest_skips_damaged_newer_checkpoints_and_names_them(tmp_path, cfg):
    state = {"step": 2, "consumed_samples": 16, "config": cfg.to_dict()}
    names = []
    for step in (2, 4, 6):
        names.append(
            make_checkpoint(tmp_path / f"checkpoint_{step:08d}", {**state, "step": step}).name
        )
    index.write_index(str(tmp_path), names)
    f = tmp_path / "checkpoint_00000006" / "rng" / "rank_1.pt"
    f.write_bytes(f.read_bytes()[:10])
    found = index.latest(str(tmp_path))
    assert found.name == "checkpoint_00000004"
    assert [Path(u).name for u, _ in found.damaged] == ["checkpoint_00000006"]
    assert "rank_1.pt: truncated" in found.damaged[0][1]


# ---------------------------------------------------------------- compatibility rules


def _other(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v * 2
    if v is None:
        return 2
    return {"learned": "rope", "layernorm": "rmsnorm", "gelu": "swiglu"}[v]


@pytest.mark.parametrize("key", MODEL_SHAPE_FIELDS)
def test_every_model_shape_field_is_a_problem(cfg, key):
    saved = cfg.to_dict()
    now = copy.deepcopy(saved)
    now["model"][key] = _other(saved["model"][key])
    problems, notes = compare_configs(saved, now)
    # resolved values: n_head also changes n_kv_head=None's value, pos_embedding hides block_size
    mine = [p for p in problems if p.startswith(f"model.{key} is ")]
    assert len(mine) == 1 and mine[0].endswith(f", {now['model'][key]!r} now"), problems
    assert all(p.startswith("model.") for p in problems), problems
    assert notes == []


def test_shapes_are_compared_on_resolved_values(cfg):
    saved = cfg.to_dict()
    now = copy.deepcopy(saved)
    now["model"]["n_kv_head"] = saved["model"]["n_head"]  # None resolves to n_head
    now["model"]["d_ff"] = 4 * saved["model"]["d_model"]  # None resolves to 4 x d_model
    assert compare_configs(saved, now) == ([], [])
    for side in (saved, now):
        side["model"].update(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", d_ff=None)
    now["model"]["rope_theta"] = 500000.0
    problems, _ = compare_configs(saved, now)
    assert problems == ["model.rope_theta is 10000.0 there, 500000.0 now"]


def test_another_seed_on_resume_is_a_problem(cfg):
    saved = cfg.to_dict()
    now = copy.deepcopy(saved)
    now["trainer"]["seed"] = saved["trainer"]["seed"] + 1
    problems, _ = compare_configs(saved, now)
    assert problems == [
        f"trainer.seed is {saved['trainer']['seed']} there, {saved['trainer']['seed'] + 1} now "
        "(it decides the data order and initial weights)"
    ]


@pytest.mark.parametrize("group, key", LAYOUT_FIELDS)
def test_layout_changes_are_notes_not_problems(cfg, group, key):
    saved = cfg.to_dict()
    now = copy.deepcopy(saved)
    v = saved[group][key]
    now[group][key] = "fp32" if key == "name" else _other(v)
    problems, notes = compare_configs(saved, now)
    assert problems == [] and notes == [f"{group}.{key} {v!r} -> {now[group][key]!r}"]


@pytest.mark.parametrize(
    "group, key, value, problem",
    [
        ("data", "seq_len", 32, "data.seq_len is 64 there, 32 now"),
        ("optim", "lr", 1e-3, None),
        ("trainer", "max_steps", 500, None),
        ("model", "dropout", 0.1, None),
        ("model", "activation_checkpointing", True, None),
        # no tokenizer hash on either side: the settings that decide the BPE are compared
        ("data", "vocab_size", 384, "data.vocab_size is 512 there, 384 now (it decides"),
        ("data", "max_documents", 80, "data.max_documents is 40 there, 80 now (it decides"),
        ("data", "tokenizer", "/x/tokenizer.json", "data.tokenizer is None there"),
        ("data", "samples_per_shard", 64, None),
    ],
)
def test_rule_table(cfg, group, key, value, problem):
    saved = cfg.to_dict()
    now = copy.deepcopy(saved)
    now[group][key] = value
    problems, _ = compare_configs(saved, now)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_tokenizer_hashes_decide_when_both_are_known(cfg):
    saved = cfg.to_dict()
    now = copy.deepcopy(saved)
    now["data"]["vocab_size"] = 384  # settings differ, but the tokenizer file is the same
    same = ("a" * 64, "/old/manifest.json")
    assert compare_configs(saved, now, saved_tok=same, now_tok=("a" * 64, "/new"))[0] == []
    problems, _ = compare_configs(saved, saved, saved_tok=same, now_tok=("b" * 64, "/new"))
    assert problems == ["the tokenizer is sha256 aaaaaaaaaaaa there, bbbbbbbbbbbb now (from /new)"]


# ------------------------------------------------------------ on a synthetic run dir


def _run_with_checkpoint(cfg, **config_changes) -> Path:
    saved = cfg.to_dict()
    for dotted, value in config_changes.items():
        group, key = dotted.split("__")
        saved[group][key] = value
    state = {"step": 10, "consumed_samples": 80, "config": saved}
    run_dir = cfg.run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    make_checkpoint(run_dir / "checkpoint_00000010", state)
    index.write_index(str(run_dir), ["checkpoint_00000010"])
    return run_dir


def test_compatible_checkpoint_is_returned_and_nothing_is_written(cfg, capsys):
    run_dir = _run_with_checkpoint(cfg, parallel__zero_stage=3)
    before = digest(run_dir)
    assert check_resume_compatible(cfg) == str(run_dir / "checkpoint_00000010")
    out = capsys.readouterr().out
    assert "continues from" in out and "parallel.zero_stage 3 -> 2" in out
    assert digest(run_dir) == before


def test_other_model_shape_is_one_config_error_line(cfg):
    run_dir = _run_with_checkpoint(cfg, model__n_layer=4)
    before = digest(run_dir)
    with pytest.raises(ConfigError) as e:
        check_resume_compatible(cfg)
    assert str(e.value) == (
        "cannot resume run 'r' from checkpoint_00000010: model.n_layer is 4 there, 2 now "
        "(start a new run.name, or restore the config)"
    )
    assert digest(run_dir) == before


def test_damaged_checkpoint_is_a_config_error_naming_the_file(cfg):
    run_dir = _run_with_checkpoint(cfg)
    (run_dir / "checkpoint_00000010" / "ds" / "latest").write_text("dz")
    with pytest.raises(ConfigError) as e:
        check_resume_compatible(cfg)
    msg = str(e.value)
    assert msg.startswith("cannot resume run 'r' from checkpoint_00000010: ")
    assert "ds/latest: hash mismatch" in msg and "\n" not in msg


def test_registered_checkpoint_that_is_gone_is_a_config_error(cfg):
    run_dir = _run_with_checkpoint(cfg)
    index.write_index(str(run_dir), ["checkpoint_00000010", "checkpoint_00000020"])
    with pytest.raises(ConfigError, match="checkpoint_00000020 is missing"):
        check_resume_compatible(cfg)


def test_no_run_dir_means_a_fresh_start(cfg):
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    assert check_resume_compatible(cfg) is None
