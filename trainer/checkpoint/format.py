"""One checkpoint on disk: DeepSpeed sharded engine state + RNG + trainer state, verified.

Layout of one checkpoint directory (every worker's files are merged into it; which
checkpoints a run has is trainer/checkpoint/index.py's, how they are written
trainer/checkpoint/manager.py's):
    ds/                       DeepSpeed engine state (model, optimizer shards per rank)
    rng/rank_<r>.pt           torch/numpy/python RNG states of each rank (tensors only)
    files/rank_<r>.json       what rank r wrote here: relative path -> size and sha256
    trainer_state.json        step, consumed samples, loader state, W&B id, config, tokenizer

`verify_checkpoint` checks a directory against every rank's files/rank_<r>.json before anything
is loaded from it: a file that is missing, truncated or altered fails with one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from data_pipeline import storage

DS_TAG = "ds"
STATE_FILE = "trainer_state.json"
FILES_DIR = "files"  # files/rank_<r>.json: the integrity record of each rank
INTEGRITY_KEY = "integrity"  # in trainer_state.json: {"world_size": N} -> N records expected


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted; str() is one line naming the file and the problem."""


def rng_state() -> dict[str, Any]:
    """This process's torch/numpy/python RNG states as tensors, and the CUDA generator's where
    this process uses CUDA. "Uses" is torch.cuda.is_initialized(), not is_available(): a CPU
    worker on a GPU host never touches CUDA (asking for its RNG state would create a context
    on the host's GPU), and a GPU worker has initialised CUDA long before it saves."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores rng_state(); the CUDA generator only in a process that uses CUDA (a GPU
    checkpoint resumed on CPU workers keeps the CPU states)."""
    torch.set_rng_state(state["torch"])
    pos, has_gauss = (int(x) for x in state["numpy_pos"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            pos,
            has_gauss,
            float(state["numpy_gauss"][0]),
        )
    )
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class LocalSave:
    """One worker's share of a checkpoint, snapshotted: `dir` holds what was written to disk
    at once (RNG, rank 0's trainer state, DeepSpeed's small `latest` file and scripts) and
    `buffered` how to write DeepSpeed's state files from their in-memory snapshot (path ->
    write(path)). `finish` writes them and the integrity record; it may run on another thread
    while training goes on, since the snapshot shares nothing with the live tensors."""

    dir: Path
    rank: int
    buffered: dict[Path, Callable[[str], None]] = field(default_factory=dict)

    def finish(self) -> Path:
        """Writes the buffered files, then files/rank_<rank>.json; returns the directory."""
        for path, write in self.buffered.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write(str(path))
        self.buffered = {}
        write_file_record(self.dir, self.rank)
        return self.dir


def save_local(
    engine, rank: int, trainer_state: dict[str, Any], patches: EnginePatches
) -> LocalSave:
    """Snapshots this worker's share of a checkpoint into a fresh local directory.

    DeepSpeed's state files are snapshotted in memory (the engine owner's buffered_saves), not
    written: the caller writes them with LocalSave.finish, in the background if it likes.
    """
    d = Path(tempfile.mkdtemp(prefix="raygpt-ckpt-"))
    out = LocalSave(d, rank)
    with patches.buffered_saves(
        engine, lambda path, write: out.buffered.__setitem__(Path(path), write)
    ):
        engine.save_checkpoint(str(d / "ds"), tag=DS_TAG)
    (d / "rng").mkdir()
    torch.save(rng_state(), d / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        state = {
            **trainer_state,
            INTEGRITY_KEY: {"world_size": _world_size(trainer_state)},
            "tokenizer": _tokenizer_info(trainer_state),
        }
        (d / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    return out


def _world_size(trainer_state: dict[str, Any]) -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return int(trainer_state["config"]["cluster"]["num_workers"])
    except (KeyError, TypeError, ValueError):
        return 1


def _tokenizer_info(trainer_state: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The tokenizer the run trains with (from its dataset's manifest), kept in the checkpoint
    so a resume can be checked against it even after the dataset directory is gone."""
    from data_pipeline.manifest import read_manifest

    try:
        out_dir = str(trainer_state["config"]["data"]["out_dir"])
        tok = read_manifest(out_dir).tokenizer
        return {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "data_dir": out_dir}
    except (KeyError, TypeError, ValueError, OSError, AttributeError):
        return None


def file_sha256(path: Path | str) -> str:
    """sha256 of a local file or a storage URI, streamed (again from its start when an object
    store fails transiently mid-stream: storage.retrying)."""

    def run() -> str:
        digest = hashlib.sha256()
        with storage.open_input(str(path)) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    return storage.retrying("hash", str(path), run)


def write_file_record(ckpt_dir: Path, rank: int) -> Path:
    """files/rank_<rank>.json: relative path -> {size, sha256} of every file under ckpt_dir."""
    ckpt_dir = Path(ckpt_dir)
    files = {
        p.relative_to(ckpt_dir).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(ckpt_dir.rglob("*"))
        if p.is_file() and p.relative_to(ckpt_dir).parts[0] != FILES_DIR
    }
    out = ckpt_dir / FILES_DIR / f"rank_{rank}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rank": rank, "files": files}, indent=1) + "\n")
    return out


def verify_checkpoint(ckpt: Path | str, *, hashes: bool = True) -> None:
    """Raises CheckpointError (one line naming the file) unless the checkpoint is intact.

    `ckpt` is a local path or a storage URI. trainer_state.json must exist and parse. Every
    rank's files/rank_<r>.json must be present (as many as trainer_state's
    integrity.world_size) and every file it lists must exist with the recorded size and, with
    `hashes`, sha256. Checkpoints written before these records existed (no files/ dir, no
    integrity key) are checked for trainer_state.json only.
    """
    ckpt = str(ckpt)
    state = _read_state_checked(ckpt)
    integrity = state.get(INTEGRITY_KEY)
    present = _listing(ckpt)
    records = sorted(
        r for r in present if r.startswith(f"{FILES_DIR}/rank_") and r.endswith(".json")
    )
    if integrity is None and not records:
        return  # written before integrity records existed
    world = _int_or_none(integrity.get("world_size")) if isinstance(integrity, dict) else None
    wanted = sorted(set(records) | {f"{FILES_DIR}/rank_{r}.json" for r in range(world or 0)})
    if not wanted:
        raise CheckpointError(
            f"{storage.join(ckpt, FILES_DIR)}: missing (no integrity record of any rank)"
        )
    expected: dict[str, list[tuple[int, str]]] = {}
    for rel in wanted:
        rec_file = storage.join(ckpt, rel)
        if rel not in present:
            raise CheckpointError(f"{rec_file}: missing (integrity record of a rank that saved)")
        try:
            for f, meta in json.loads(storage.read_text(rec_file))["files"].items():
                expected.setdefault(f, []).append((int(meta["size"]), str(meta["sha256"])))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{rec_file}: unreadable integrity record ({e})") from None
    for rel, claims in sorted(expected.items()):
        _check_file(ckpt, rel, present.get(rel), claims, hashes)


def _listing(ckpt: str) -> dict[str, int]:
    try:
        return storage.walk_files(ckpt)
    except OSError as e:
        raise CheckpointError(f"{ckpt}: cannot list ({storage.one_line(e)})") from None


def _check_file(
    ckpt: str, rel: str, size: Optional[int], claims: list[tuple[int, str]], hashes: bool
) -> None:
    """One file against what its writer(s) recorded (ranks that wrote the same path agree)."""
    path = storage.join(ckpt, rel)
    if size is None:
        raise CheckpointError(f"{path}: missing (expected {claims[0][0]} bytes)")
    sizes = sorted({s for s, _ in claims})
    if size not in sizes:
        what = "truncated" if size < max(sizes) else "wrong size"
        raise CheckpointError(f"{path}: {what}: expected {sizes[-1]} bytes, found {size}")
    if hashes:
        want = {sha for s, sha in claims if s == size}
        got = file_sha256(path)
        if got not in want:
            raise CheckpointError(
                f"{path}: hash mismatch: sha256 {got[:16]}..., expected {sorted(want)[0][:16]}..."
            )


def _int_or_none(v: Any) -> Optional[int]:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _read_state_checked(ckpt: str) -> dict[str, Any]:
    path = storage.join(str(ckpt), STATE_FILE)
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({storage.one_line(e)})") from None
    try:
        state = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a trainer state (no 'step')")
    return state


def read_trainer_state(ckpt: Path | str) -> dict[str, Any]:
    """trainer_state.json of a checkpoint (local path or storage URI)."""
    return json.loads(storage.read_text(storage.join(str(ckpt), STATE_FILE)))


def deepspeed_safe_globals() -> list[type]:
    """The non-tensor classes DeepSpeed pickles into its checkpoint files: the loss scaler, the
    ZeRO stage enum and the fragment addresses of param_slice_mappings (found by listing the
    pickle globals of ZeRO 0-3, AutoTP and pipeline checkpoints, fp32 and bf16). Model-state
    and layer files hold only tensors, containers and torch.Size."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: Any, map_location: Any = None, mmap: bool = False) -> Any:
    """torch.load(weights_only=True) allowing exactly deepspeed_safe_globals(). A file that
    pickles anything else (which could run code when loaded) raises CheckpointError."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = found.group(1) if found else "an object weights_only loading refuses"
        raise CheckpointError(
            f"refusing to load {path}: it pickles {what}, which is neither a tensor nor one of "
            "the DeepSpeed types a checkpoint holds"
        ) from None


@dataclass(frozen=True)
class EnginePatches:
    """What DeepSpeed needs patched to save and load a checkpoint, handed in by the engine's
    owner (trainer/worker/ds_patches.py holds every patch), so this package imports no worker
    code: weights_only(engine, load) makes its checkpoint engine load with `load`;
    universal(engine) makes engine.load_checkpoint read a universal checkpoint;
    buffered_saves(engine, sink) snapshots each state its checkpoint engine would write and
    hands sink(path, write) a function that writes that file later."""

    weights_only: Callable[[Any, Callable], AbstractContextManager[None]]
    universal: Callable[[Any], AbstractContextManager[None]]
    buffered_saves: Callable[
        [Any, Callable[[str, Callable[[str], None]], None]], AbstractContextManager[None]
    ]


def load(
    engine,
    ckpt_dir: Path,
    rank: int,
    patches: EnginePatches,
    *,
    universal_dir: Optional[Path] = None,
) -> dict[str, Any]:
    """Restores engine and RNG state from a checkpoint directory; returns its trainer state.

    Checks sizes against the integrity records first (the driver has verified the hashes of
    the checkpoint it resumes from: trainer/checkpoint/compat.py). With `universal_dir` (the
    checkpoint converted by trainer/checkpoint/universal.py for another layout) the engine
    state comes from there, loaded as a DeepSpeed universal checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    verify_checkpoint(ckpt_dir, hashes=False)
    if universal_dir is None:
        with patches.weights_only(engine, safe_torch_load):
            path, _ = engine.load_checkpoint(
                str(ckpt_dir / "ds"),
                tag=DS_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
    else:
        # Universal files are read by DeepSpeed with torch.load directly; they were written
        # on the driver from this verified checkpoint (trainer/checkpoint/universal.py).
        with patches.universal(engine):
            path, _ = engine.load_checkpoint(
                str(universal_dir),
                tag=DS_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
    if path is None:
        raise RuntimeError(
            f"DeepSpeed found no checkpoint under {universal_dir or ckpt_dir / 'ds'}"
        )
    rng_file = ckpt_dir / "rng" / f"rank_{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return read_trainer_state(ckpt_dir)
