"""What a checkpoint can be resumed under: compared on the driver before any worker starts.

What the saved weights cannot survive (another model shape, another sequence length, another
tokenizer) or what would silently re-order the data (another trainer.seed: the data order is
a keyed function of it) is a ConfigError: one `error:` line, exit 2, the run directory left as
it was. A new parallel layout, ZeRO stage or number of workers is not an error: it is reported
on one info line (and converted when needed: trainer/checkpoint/universal.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from data_pipeline import storage
from data_pipeline.config import DataConfig
from data_pipeline.manifest import manifest_uri, read_manifest
from models.gpt import GPTConfig, shape_of
from trainer.checkpoint.format import CheckpointError, file_sha256, read_trainer_state
from trainer.checkpoint.index import INDEX_FILE, latest
from trainer.checkpoint.shards import LAYOUT_FIELDS
from trainer.config import ConfigError, RootConfig

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
    "val_sources",
    "split_column",
)
HINT = "start a new run.name, or restore the config"


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def saved_tokenizer(state: dict[str, Any]) -> Optional[tuple[str, str]]:
    """(sha256, where) of the tokenizer the checkpoint was trained with, if known."""
    tok = state.get("tokenizer")
    if isinstance(tok, dict) and tok.get("sha256"):
        return str(tok["sha256"]), "recorded in the checkpoint"
    try:
        out_dir = str(state["config"]["data"]["out_dir"])
    except (KeyError, TypeError):
        return None
    return _manifest_tokenizer(out_dir)


def current_tokenizer(data: DataConfig) -> Optional[tuple[str, str]]:
    """(sha256, where) of the tokenizer this invocation will train with, if known yet."""
    found = _manifest_tokenizer(data.out_dir)
    if found is None and data.tokenizer and Path(data.tokenizer).is_file():
        found = file_sha256(Path(data.tokenizer)), f"data.tokenizer={data.tokenizer}"
    return found


def _manifest_tokenizer(out_dir: str) -> Optional[tuple[str, str]]:
    try:
        manifest = read_manifest(out_dir)
    except (OSError, ValueError):
        return None
    if manifest is None or not manifest.tokenizer.sha256:
        return None
    return str(manifest.tokenizer.sha256), manifest_uri(out_dir)


def _shape(model: Any) -> Optional[dict[str, Any]]:
    """Resolved shape values of a saved model config (raw values if it no longer builds)."""
    if not isinstance(model, dict):
        return None
    known = set(GPTConfig.__dataclass_fields__)
    try:
        return shape_of(GPTConfig(**{k: v for k, v in model.items() if k in known}))
    except (TypeError, ValueError):
        keys = [*shape_of(GPTConfig()), "rope_theta"]
        return {k: model[k] for k in keys if k in model}


def compare_configs(
    saved: dict[str, Any],
    now: dict[str, Any],
    *,
    saved_tok: Optional[tuple[str, str]] = None,
    now_tok: Optional[tuple[str, str]] = None,
) -> tuple[list[str], list[str]]:
    """(problems, notes) of resuming a checkpoint saved with config `saved` under `now`.

    Both are RootConfig.to_dict() shaped. A problem makes the saved weights unusable or the
    data order different; a note is a change the resume survives (layout, ZeRO stage,
    workers, precision). Model shapes are compared on resolved values (models.gpt.shape_of).
    """
    problems: list[str] = []
    a, b = _shape(saved.get("model")), _shape(now.get("model"))
    if a is not None and b is not None:
        for key in a:  # a key only one side has follows from one that differs (pos_embedding)
            if key in b and a[key] != b[key]:
                problems.append(f"model.{key} is {_fmt(a[key])} there, {_fmt(b[key])} now")
    _diff(problems, saved, now, "data", "seq_len")
    _diff(problems, saved, now, "trainer", "seed", what="the data order and initial weights")
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


def check_resume_compatible(cfg: RootConfig, *, echo: bool = True) -> Optional[str]:
    """URI of the checkpoint this run will resume from (verified and compatible), or None.

    Raises ConfigError (one line) when that checkpoint is damaged or was saved with a model
    shape, data.seq_len, trainer.seed or tokenizer other than `cfg`'s. Prints one info line
    when resuming. Reads the run directory (any storage) and writes nothing.
    """
    try:
        found = latest(cfg.run_uri)
    except CheckpointError as e:
        raise ConfigError(f"cannot resume run '{cfg.run.name}': {e}") from None
    if found.damaged:  # the newest registered one: resuming an older one would redo steps
        ckpt, problem = found.damaged[0]
        where = f"cannot resume run '{cfg.run.name}' from {storage.name(ckpt)}"
        if not storage.is_dir(ckpt):
            raise ConfigError(
                f"{where}: {ckpt} is missing though {INDEX_FILE} registers it "
                "(restore it, or start a new run.name)"
            )
        raise ConfigError(
            f"{where}: {problem} (the checkpoint is damaged: restore it, or start a new run.name)"
        )
    ckpt = found.uri
    if ckpt is None:
        return None
    where = f"cannot resume run '{cfg.run.name}' from {storage.name(ckpt)}"
    try:
        state = read_trainer_state(ckpt)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {storage.one_line(e)}") from None
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
