"""Resume safety, checked on the driver before any worker starts.

Running the same run.name again makes Ray Train hand every worker the latest checkpoint it
registered. Before that happens, `check_resume_compatible` finds that checkpoint, verifies its
files (trainer/checkpoint.py: verify_checkpoint) and compares the config saved in it with the
config of this invocation. What the saved weights cannot survive (another model shape, another
sequence length, another tokenizer) is a ConfigError, i.e. one `error:` line and exit 2, and the
run directory is left as it was. A new parallel layout, ZeRO stage or number of workers is not
an error here: it is reported on one info line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from data_pipeline.config import DataConfig
from trainer.checkpoint import CheckpointError, file_sha256, read_trainer_state, verify_checkpoint
from trainer.config import ConfigError, RootConfig

# Ray Train V2 keeps the checkpoints it registered here, in the run directory.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
CHECKPOINT_PREFIX = "checkpoint_"

# Fields that decide the shapes (and meaning) of the saved weights.
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
# A trained BPE is decided by these; compared only when a tokenizer hash is not available.
TOKENIZER_SETTINGS = (
    "tokenizer",
    "vocab_size",
    "sources",
    "format",
    "text_column",
    "max_documents",
    "val_fraction",
    "seed",
)
# Allowed to change on resume (reported, not refused).
LAYOUT_FIELDS = (
    ("cluster", "num_workers"),
    ("parallel", "zero_stage"),
    ("parallel", "tensor_parallel"),
    ("parallel", "pipeline_parallel"),
    ("parallel", "offload_optimizer"),
    ("parallel", "offload_params"),
    ("precision", "name"),
)
HINT = "start a new run.name, or restore the config"


def find_resume_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint Ray Train will resume `run_dir` from, or None.

    Ray's snapshot names it (`latest_checkpoint_result.checkpoint_dir_name`); a snapshot that
    exists but registered no checkpoint, or no snapshot at all, means a fresh start (checkpoint
    directories without a snapshot were never registered: see set_aside_unregistered). With an
    unreadable snapshot (a kill while Ray rewrote it) the newest complete checkpoint_* directory
    is taken: repair_snapshot makes Ray agree before it starts.
    """
    run_dir = Path(run_dir)
    snapshot = run_dir / SNAPSHOT_FILE
    if not snapshot.is_file():
        return None
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        if latest is None:
            return None
        return run_dir / str(latest["checkpoint_dir_name"])
    except (OSError, ValueError, KeyError, TypeError):
        complete = complete_checkpoints(run_dir)
        return complete[-1] if complete else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint_* directories of `run_dir` that pass verify_checkpoint, oldest first."""
    out = []
    for d in sorted(
        (p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()), key=_step_of
    ):
        try:
            verify_checkpoint(d)
            out.append(d)
        except CheckpointError:
            pass
    return out


def repair_snapshot(run_dir: Path, *, echo: bool = True) -> Optional[Path]:
    """Rewrites an unreadable checkpoint_manager_snapshot.json from the complete checkpoints on
    disk (the damaged file is kept beside it as .corrupt). Ray writes the snapshot in place, so
    a driver killed at that moment leaves it truncated, and Ray would refuse to start. Returns
    the kept copy, or None when the snapshot was fine (or absent)."""
    import ray

    run_dir = Path(run_dir)
    snapshot = run_dir / SNAPSHOT_FILE
    if not snapshot.is_file() or registered_checkpoints(run_dir) is not None:
        return None
    entries = [
        {"version": 0, "checkpoint_dir_name": d.name, "metrics": {"step": _step_of(d)[0]}}
        for d in complete_checkpoints(run_dir)
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
    kept = snapshot.with_name(f"{SNAPSHOT_FILE}.corrupt")
    os.replace(snapshot, kept)
    tmp = snapshot.with_name(f".{SNAPSHOT_FILE}.tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, snapshot)
    if echo:
        latest = entries[-1]["checkpoint_dir_name"] if entries else "none"
        print(
            f"resume: {SNAPSHOT_FILE} was unreadable (kept as {kept.name}); rebuilt from "
            f"{len(entries)} complete checkpoints, latest {latest}"
        )
    return kept


INCOMPLETE_DIR = "incomplete"


def registered_checkpoints(run_dir: Path) -> Optional[set[str]]:
    """Names of the checkpoints Ray's snapshot registers (None: no readable snapshot)."""
    try:
        snapshot = json.loads((Path(run_dir) / SNAPSHOT_FILE).read_text())
        return {str(r["checkpoint_dir_name"]) for r in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def set_aside_unregistered(run_dir: Path, *, echo: bool = True) -> list[Path]:
    """Moves checkpoint_* directories that Ray never registered into run_dir/incomplete/.

    Such a directory is what a run killed while writing a checkpoint leaves behind (some ranks'
    shards, no registration). Ray resumes from its snapshot and ignores it, but the resumed run
    would later write the same directory name on top of the leftovers. Nothing is deleted.
    Without a snapshot file no checkpoint was ever registered, so every checkpoint_* goes.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    snapshot_exists = (run_dir / SNAPSHOT_FILE).is_file()
    registered = registered_checkpoints(run_dir)
    if snapshot_exists and registered is None:
        return []  # unreadable snapshot: touch nothing (check_resume_compatible reports it)
    moved = []
    for d in sorted(p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()):
        if d.name in (registered or set()):
            continue
        dest = run_dir / INCOMPLETE_DIR / d.name
        n = 1
        while dest.exists():
            dest, n = run_dir / INCOMPLETE_DIR / f"{d.name}.{n}", n + 1
        dest.parent.mkdir(exist_ok=True)
        d.rename(dest)
        moved.append(dest)
        if echo:
            print(
                f"resume: {d.name} was never completed (the run stopped while writing it); "
                f"moved to {dest.relative_to(run_dir)}"
            )
    return moved


def _step_of(p: Path) -> tuple[int, str]:
    suffix = p.name[len(CHECKPOINT_PREFIX) :]
    return (int(suffix) if suffix.isdigit() else -1, p.name)


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def saved_tokenizer(state: dict[str, Any]) -> Optional[tuple[str, str]]:
    """(sha256, where) of the tokenizer the checkpoint was trained with, if known."""
    tok = state.get("tokenizer")
    if isinstance(tok, dict) and tok.get("sha256"):
        return str(tok["sha256"]), "recorded in the checkpoint"
    try:
        out_dir = Path(state["config"]["data"]["out_dir"])
    except (KeyError, TypeError):
        return None
    return _manifest_tokenizer(out_dir)


def current_tokenizer(data: DataConfig) -> Optional[tuple[str, str]]:
    """(sha256, where) of the tokenizer this invocation will train with, if known yet."""
    found = _manifest_tokenizer(Path(data.out_dir))
    if found is None and data.tokenizer and Path(data.tokenizer).is_file():
        found = file_sha256(Path(data.tokenizer)), f"data.tokenizer={data.tokenizer}"
    return found


def _manifest_tokenizer(out_dir: Path) -> Optional[tuple[str, str]]:
    manifest = out_dir / "manifest.json"
    try:
        return str(json.loads(manifest.read_text())["tokenizer"]["sha256"]), str(manifest)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def compare_configs(
    saved: dict[str, Any],
    now: dict[str, Any],
    *,
    saved_tok: Optional[tuple[str, str]] = None,
    now_tok: Optional[tuple[str, str]] = None,
) -> tuple[list[str], list[str]]:
    """(problems, notes) of resuming a checkpoint saved with config `saved` under `now`.

    Both are RootConfig.to_dict() shaped. A problem makes the saved weights unusable; a note
    is a change the resume survives (layout, ZeRO stage, workers, precision).
    """
    problems: list[str] = []
    for key in MODEL_SHAPE_FIELDS:
        _diff(problems, saved, now, "model", key)
    _diff(problems, saved, now, "data", "seq_len")
    if saved_tok is not None and now_tok is not None:
        if saved_tok[0] != now_tok[0]:
            problems.append(
                f"the tokenizer is sha256 {saved_tok[0][:12]} there, {now_tok[0][:12]} now "
                f"(from {now_tok[1]})"
            )
    else:  # one side is not prepared yet: compare what decides the tokenizer
        for key in TOKENIZER_SETTINGS:
            if key != "tokenizer" and _get(now, "data", "tokenizer"):
                continue  # a given tokenizer file: only its path can be compared
            _diff(problems, saved, now, "data", key, what="the tokenizer")
    notes: list[str] = []
    for group, key in LAYOUT_FIELDS:
        _diff(notes, saved, now, group, key, arrow=True)
    return problems, notes


_MISSING = object()


def _get(cfg: dict[str, Any], group: str, key: str) -> Any:
    section = cfg.get(group)
    return section.get(key, _MISSING) if isinstance(section, dict) else _MISSING


def _diff(
    out: list[str],
    saved: dict[str, Any],
    now: dict[str, Any],
    group: str,
    key: str,
    *,
    arrow: bool = False,
    what: str = "",
) -> None:
    a, b = _get(saved, group, key), _get(now, group, key)
    if a is _MISSING or b is _MISSING or a == b:
        return  # older checkpoints may lack a field: nothing to compare
    if arrow:
        out.append(f"{group}.{key} {_fmt(a)} -> {_fmt(b)}")
    else:
        decides = f" (it decides {what})" if what else ""
        out.append(f"{group}.{key} is {_fmt(a)} there, {_fmt(b)} now{decides}")


def check_resume_compatible(cfg: RootConfig, *, echo: bool = True) -> Optional[Path]:
    """The checkpoint this run will resume from (verified and compatible), or None.

    Raises ConfigError (one line) when that checkpoint is damaged or was saved with a model
    shape, data.seq_len or tokenizer other than `cfg`'s. Prints one info line when resuming.
    Runs on the driver; reads the run directory and writes nothing.
    """
    if "://" in cfg.run.root:
        if echo:
            print(f"resume: {cfg.run.root} is remote storage; checkpoint checks left to Ray")
        return None
    ckpt = find_resume_checkpoint(cfg.run_dir)
    if ckpt is None:
        return None
    where = f"cannot resume run '{cfg.run.name}' from {ckpt.name}"
    if not ckpt.is_dir():
        raise ConfigError(
            f"{where}: {ckpt} is missing though {SNAPSHOT_FILE} registers it "
            "(restore it, or start a new run.name)"
        )
    try:
        verify_checkpoint(ckpt)
        state = read_trainer_state(ckpt)
    except CheckpointError as e:
        raise ConfigError(
            f"{where}: {e} (the checkpoint is damaged: restore it, or start a new run.name)"
        ) from None
    saved_cfg = state.get("config")
    notes: list[str] = []
    if isinstance(saved_cfg, dict):
        problems, notes = compare_configs(
            saved_cfg,
            cfg.to_dict(),
            saved_tok=saved_tokenizer(state),
            now_tok=current_tokenizer(cfg.data),
        )
        if problems:
            raise ConfigError(f"{where}: {'; '.join(problems)} ({HINT})")
    else:
        notes = ["it holds no config, so model shape and tokenizer were not compared"]
    if echo:
        changed = f"; changed since: {', '.join(notes)}" if notes else ""
        print(f"resume: run '{cfg.run.name}' continues from {ckpt} (step {state['step']}){changed}")
        sys.stdout.flush()
    return ckpt
