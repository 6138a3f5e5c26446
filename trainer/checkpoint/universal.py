"""Resume at another data-parallel size (or ZeRO stage) through DeepSpeed universal checkpoints.

ZeRO saves the optimizer state as one shard per data-parallel rank, so a checkpoint written by 2
workers cannot be loaded natively by 1 (or 4). When the driver sees that the checkpoint a run
resumes from was written with another data-parallel size, ZeRO stage or precision, it converts
that checkpoint once with DeepSpeed's ds_to_universal (per-parameter fp32 weights and Adam
moments, independent of the layout) into run_dir/universal/<checkpoint name>/, and every worker
loads it with load_universal. The next checkpoint is written natively at the new size. The
checkpoint itself is only read; the conversion appears complete or not at all (it is written
beside its destination and renamed).

The data stream needs nothing: the loader's position is the global consumed-sample count,
which does not depend on the number of workers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from data_pipeline import storage
from trainer.checkpoint.format import DS_TAG
from trainer.checkpoint.shards import ShardLayout, is_optim_states
from trainer.config import ConfigError, RootConfig

DIR = "universal"
LOG = "convert.log"
# What a conversion changes (ShardLayout fields); tensor and pipeline sizes must stay.
CONVERTED = ("dp", "zero", "precision")


def layouts(
    cfg: RootConfig, ckpt: str, saved_cfg: dict[str, Any]
) -> tuple[ShardLayout, ShardLayout]:
    """(the layout `ckpt` was saved under, this run's layout); ConfigError (one line) when the
    checkpoint's config has none."""
    try:
        return ShardLayout.of(saved_cfg), ShardLayout.of(cfg.to_dict())
    except ValueError as e:
        raise ConfigError(
            f"{storage.name(str(ckpt))}: its config has no valid layout: {e}"
        ) from None


def has_zero_shards(ckpt: str) -> bool:
    return any(map(is_optim_states, storage.listdir(storage.join(str(ckpt), "ds", DS_TAG))))


def _changes(was: ShardLayout, now: ShardLayout) -> list[str]:
    """The CONVERTED fields that differ."""
    return [k for k in CONVERTED if getattr(was, k) != getattr(now, k)]


def _arrows(was: ShardLayout, now: ShardLayout, keys: list[str]) -> str:
    return ", ".join(f"{k} {getattr(was, k)} -> {getattr(now, k)}" for k in keys)


def plan(cfg: RootConfig, ckpt: str, saved_cfg: dict[str, Any]) -> bool:
    """True if resuming `ckpt` under `cfg` needs a universal conversion; ConfigError (one line)
    if the change cannot be resumed at all."""
    was, now = layouts(cfg, ckpt, saved_cfg)
    where = f"cannot resume run '{cfg.run.name}' from {storage.name(str(ckpt))}"
    for k, name in (("tp", "parallel.tensor_parallel"), ("pp", "parallel.pipeline_parallel")):
        before, after = getattr(was, k), getattr(now, k)
        if before != after:
            raise ConfigError(
                f"{where}: {name} was {before}, now {after}; resuming at another tensor or "
                f"pipeline size is not supported (the data-parallel size may change): keep "
                f"{name}={before}, or export it (python -m trainer.export) and start a new run "
                "with model.init_from"
            )
    changed = _changes(was, now)
    if not changed:
        return False
    if was.model_parallel > 1:
        raise ConfigError(
            f"{where}: {_arrows(was, now, changed)} with tensor or pipeline parallelism is not "
            "supported; keep the layout it was saved with"
        )
    if has_zero_shards(ckpt):
        return True
    if changed == ["dp"] and now.zero == 0:
        return False  # one replicated optimizer state in mp_rank_00: loads at any size
    raise ConfigError(
        f"{where}: it holds no ZeRO optimizer shards (ZeRO-0), so it cannot move to "
        f"{', '.join(f'{k} {getattr(now, k)}' for k in changed)}; resume with "
        f"parallel.zero_stage=0 and precision={was.precision}"
    )


def universal_dir(cfg: RootConfig, ckpt: str) -> str:
    return storage.join(cfg.run_uri, DIR, storage.name(str(ckpt)))


def convert(ckpt: Path, out: Path) -> Path:
    """ds_to_universal of `ckpt` into `out` (out/latest_universal, out/ds/). Idempotent."""
    out = Path(out)
    if (out / "latest_universal").is_file() and (out / DS_TAG).is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    log = out.parent / f"{out.name}.{LOG}"
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(Path(ckpt) / "ds" / DS_TAG),
        "--output_folder",
        str(tmp / DS_TAG),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        # Our engines do not record DeepSpeed's (Megatron-oriented) universal_checkpoint_info.
        "--inject_missing_state",
    ]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=3600)
    if proc.returncode != 0 or not (tmp / "latest_universal").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(
            f"converting {ckpt} to a universal checkpoint failed (exit {proc.returncode}); "
            f"see {log}"
        )
    shutil.rmtree(tmp / DS_TAG / "tmp", ignore_errors=True)  # per-shard scratch files
    os.replace(tmp, out)
    return out


def prepare(cfg: RootConfig, ckpt: str, saved_cfg: dict[str, Any]) -> dict[str, str]:
    """Converts `ckpt` (plan() said it must be) and returns what the workers need:
    {"checkpoint": its name, "dir": the universal checkpoint's URI}. Prints one line. On object
    storage the checkpoint is converted in a local temp dir and the result uploaded."""
    was, now = layouts(cfg, ckpt, saved_cfg)
    what = _arrows(was, now, _changes(was, now))
    out = universal_dir(cfg, ckpt)
    name = storage.name(str(ckpt))
    print(f"resume: {what}: converting {name} to a universal checkpoint in {out}")
    sys.stdout.flush()
    if not storage.is_remote(out):
        convert(Path(ckpt), Path(out))
    elif not storage.exists(storage.join(out, "latest_universal")):
        with storage.local_copy(str(ckpt)) as local, tempfile.TemporaryDirectory() as tmp:
            storage.upload(convert(local, Path(tmp) / name), out)
    return {"checkpoint": name, "dir": out}
