"""Tokenize and pack a corpus into Parquet token shards.

    python -m data_pipeline.prepare [--overwrite] [hydra overrides, e.g. data.seq_len=512]

The command validates the data group only (the run's trainer/model/cluster settings are not
its business); an explicit data.vocab_size= that contradicts a given data.tokenizer is refused.

Steps: list and read every document once in the driver (validation, max_documents, split
counts; the split is the user's when data.val_sources / data.split_column name it, else a
hashed hold-out of data.val_fraction, with a one-line warning when the held-out share of
tokens comes out far from it); train a byte-level BPE on the train split (or load
data.tokenizer); then Ray
tasks, each over a contiguous group of work units, tokenize their documents, append EOS, pack
each split's token stream into rows of exactly seq_len + 1 tokens (the task's remainder is
dropped) and write `{split}-{task:05d}-{k:03d}.parquet` (zstd, one column `tokens` of type
fixed_size_list<int32>[seq_len + 1]).

data.out_dir is a storage URI (data_pipeline/storage.py): a local path, a shared mount, s3://
or gs://. The tasks write their shards straight into it through the URI's pyarrow filesystem,
wherever they run (a local path must then be a mount every Ray node sees); the driver writes
tokenizer.json; manifest.json comes last and is the commit marker: without it there is no
dataset. How a prepare commits, so that a refused, failed or interrupted one never damages the
dataset already there:

- local path / shared mount: everything is built in `<out_dir>.tmp-<pid>` and renamed into
  place (an overwritten dataset is renamed aside first, then removed).
- object store (there is no rename): the files go under a version prefix inside out_dir,
  `v-<first 16 hex digits of the settings fingerprint>/`, and the manifest names them there
  (its file names are relative to out_dir). Writing manifest.json (one whole object) commits;
  only then does an overwrite delete what out_dir held before. A failed prepare removes its
  version prefix unless a manifest names it; one killed outright leaves it behind, unnamed and
  unread: a prepare with the same settings writes the same files into it again, and an
  overwrite removes it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import storage
from data_pipeline.config import DataConfig, DataError
from data_pipeline.manifest import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    Manifest,
    ShardInfo,
    SplitInfo,
    TokenizerInfo,
    read_manifest,
)
from data_pipeline.sources import (
    SPLITS,
    Plan,
    WorkUnit,
    group_units,
    plan_documents,
    read_documents,
    split_description,
    split_for,
)
from data_pipeline.tokenizer import (
    Tokenizer,
    eos_id,
    file_sha256,
    load_tokenizer,
    read_file,
    train_tokenizer,
)

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TASK_CHARS = 2 << 20  # auto num_tasks: about this much text per task
MAX_AUTO_TASKS = 256
ENCODE_BATCH = 64  # documents per encode_batch call
VERSION_PREFIX = re.compile(r"v-[0-9a-f]{16}")  # object stores: where one version's files live


# ---------------------------------------------------------------------------- settings


def settings_of(cfg: DataConfig) -> dict[str, Any]:
    """The settings that decide a dataset's content (compared to find an existing one).
    val_sources and split_column appear only when set, so that datasets prepared before they
    existed keep their settings."""
    given: dict[str, Any] = {}
    if cfg.val_sources:
        given["val_sources"] = list(cfg.val_sources)
    if cfg.split_column is not None:
        given["split_column"] = cfg.split_column
    return {
        "sources": list(cfg.sources),
        **given,
        "format": cfg.format,
        "text_column": cfg.text_column,
        "tokenizer_sha256": file_sha256(cfg.tokenizer) if cfg.tokenizer else None,
        "vocab_size": None if cfg.tokenizer else cfg.vocab_size,
        "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "max_documents": cfg.max_documents,
        "num_tasks": cfg.num_tasks,
    }


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def version_of(settings: dict[str, Any]) -> str:
    """The version prefix (object stores) of a dataset with these settings."""
    return f"v-{_fingerprint(settings)[:16]}"


# ---------------------------------------------------------------------------- one task


class _ShardWriter:
    """Packs one split's token stream of one task into rows and writes full shards."""

    def __init__(self, out_dir: str, split: str, task: int, seq_len: int, rows_per_shard: int):
        self.fs, self.base = storage.filesystem(out_dir)  # any storage URI
        self.split = split
        self.task = task
        self.row_len = seq_len + 1
        self.rows_per_shard = rows_per_shard
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict[str, Any]] = []
        self.dropped_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        while self.pending_tokens >= self.rows_per_shard * self.row_len:
            self._write(self.rows_per_shard)

    def finish(self) -> None:
        rows = self.pending_tokens // self.row_len
        if rows:
            self._write(rows)
        self.dropped_tokens = self.pending_tokens
        self.pending, self.pending_tokens = [], 0

    def _write(self, rows: int) -> None:
        flat = np.concatenate(self.pending)
        take = rows * self.row_len
        values = pa.array(flat[:take], type=pa.int32())
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, self.row_len)})
        name = f"{self.split}-{self.task:05d}-{len(self.shards):03d}.parquet"
        pq.write_table(table, f"{self.base}/{name}", filesystem=self.fs, compression="zstd")
        self.shards.append({"file": name, "rows": rows})
        self.pending = [flat[take:]]
        self.pending_tokens -= take


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(tokenizer_json: str) -> Tokenizer:
    """The parsed tokenizer, once per worker process (Ray reuses workers across tasks)."""
    key = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    return _TOKENIZERS[key]


def tokenize_task(
    row: dict[str, Any],
    *,
    tokenizer_json: str,
    text_column: str,
    seq_len: int,
    val_fraction: float,
    seed: int,
    split_overrides: dict[str, str],
    samples_per_shard: int,
    out_dir: str,
    split_column: Optional[str] = None,
) -> dict[str, Any]:
    """One Ray task: tokenize and pack one group of work units (row["units"], JSON), write
    its shards into out_dir (any storage URI) and return {"task": i, "result": JSON of shards
    (names relative to out_dir) and counts}."""
    os.environ["TOKENIZERS_PARALLELISM"] = (
        "false"  # one thread per task; Ray runs tasks side by side
    )
    tok = _tokenizer(tokenizer_json)
    eos = eos_id(tok)
    # encode_batch_fast: the same ids without character offsets (~1.3x faster on 1 thread).
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    task = int(row["task"])
    units = [WorkUnit(**u) for u in json.loads(row["units"])]
    writers = {s: _ShardWriter(out_dir, s, task, seq_len, samples_per_shard) for s in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    batches: dict[str, list[str]] = {s: [] for s in SPLITS}

    def flush(split: str) -> None:
        for enc in encode_batch(batches[split], add_special_tokens=False):
            ids = np.empty(len(enc.ids) + 1, dtype=np.int32)
            ids[:-1] = enc.ids
            ids[-1] = eos
            writers[split].add(ids)
        batches[split].clear()

    for unit in units:
        for doc in read_documents(unit, text_column, split_column):
            split = split_for(doc, unit, val_fraction, seed, split_overrides)
            batches[split].append(doc.text)
            documents[split] += 1
            if len(batches[split]) >= ENCODE_BATCH:
                flush(split)
    result: dict[str, Any] = {"task": task}
    for split in SPLITS:
        flush(split)
        writers[split].finish()
        result[split] = {
            "shards": writers[split].shards,
            "documents": documents[split],
            "dropped_tokens": writers[split].dropped_tokens,
        }
    return {"task": task, "result": json.dumps(result)}


# ---------------------------------------------------------------------------- the driver


def _train_texts(plan: Plan, cfg: DataConfig) -> Iterator[str]:
    for unit in plan.units:
        for doc in read_documents(unit, cfg.text_column, cfg.split_column):
            if split_for(doc, unit, cfg.val_fraction, cfg.seed, plan.split_overrides) == "train":
                yield doc.text


def _run_tasks(
    groups: list[list[WorkUnit]], fn_kwargs: dict[str, Any], env: Optional[dict[str, str]] = None
) -> list[dict[str, Any]]:
    """tokenize_task over every group as plain Ray tasks (1 CPU each), in task order.

    Ray core tasks rather than a Ray Data map over the groups: the tasks are independent and
    coarse (one per ~2 MB of text), so Ray Data's streaming executor added nothing but its
    start-up and a polling driver thread, which cost seconds on a small machine (bench.data).
    The arguments are put into the object store once and shared by every task. `env`: extra
    environment of the tasks (the driver's object-store settings when writing to one)."""
    import ray

    shared = ray.put(fn_kwargs)
    task = ray.remote(num_cpus=1, max_retries=3)(_remote_task)
    if env:
        task = task.options(runtime_env={"env_vars": env})
    refs = [
        task.remote({"task": i, "units": json.dumps([asdict(u) for u in group])}, shared)
        for i, group in enumerate(groups)
    ]
    rows = ray.get(refs)
    results = sorted((json.loads(r["result"]) for r in rows), key=lambda r: r["task"])
    if [r["task"] for r in results] != list(range(len(groups))):
        raise RuntimeError(f"expected results of tasks 0..{len(groups) - 1}, got {len(results)}")
    return results


def _remote_task(row: dict[str, Any], fn_kwargs: dict[str, Any]) -> dict[str, Any]:
    return tokenize_task(row, **fn_kwargs)


def _commit(tmp: Path, out_dir: Path, settings: dict[str, Any]) -> Manifest | None:
    """Local commit: move tmp to out_dir. Returns the manifest of a concurrent prepare that won
    the race with the same settings (tmp is then discarded), else None."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return None
    try:
        os.rename(tmp, out_dir)
    except OSError:
        other = read_manifest(out_dir)
        if other is not None and other.settings == settings:
            shutil.rmtree(tmp, ignore_errors=True)
            return other
        raise
    return None


def _storage_error(out: str, e: BaseException) -> DataError:
    """A storage failure of data.out_dir as one DataError line naming the URI and the cause."""
    if isinstance(e, storage.StorageError) and str(e).startswith(f"data.out_dir ({out})"):
        return DataError(str(e))
    return DataError(f"data.out_dir ({out}): {storage.explain_remote(e)}")


def _holds_only_ours(out: str) -> bool:
    """out_dir is absent or empty, or (object stores) holds nothing but version prefixes."""
    if not storage.is_remote(out):
        path = Path(out)
        return not path.exists() or (path.is_dir() and not any(path.iterdir()))
    if storage.is_file(out):
        return False
    return all(VERSION_PREFIX.fullmatch(n) for n in storage.listdir(out))


# The remedy for an out_dir that holds something else, as prepare's command line spells it;
# training (which has no --overwrite) passes its own (trainer/driver/preflight.py).
OVERWRITE_HINT = "pass overwrite (--overwrite)"


def check_out_dir(cfg: DataConfig, *, hint: str = OVERWRITE_HINT) -> Manifest | None:
    """What prepare(cfg) would find in cfg.out_dir, checked without writing (see
    _check_out_dir): its manifest when it already holds this dataset, None when prepare would
    build it; DataError when prepare would refuse it (`hint`: the remedy to name)."""
    out = storage.absolute(cfg.out_dir)
    return _check_out_dir(out, settings_of(cfg), False, hint=hint)


def _check_out_dir(
    out: str, settings: dict[str, Any], overwrite: bool, *, hint: str = OVERWRITE_HINT
) -> Manifest | None:
    """What out_dir holds, checked before anything is read or written: returns its manifest
    when it already holds this dataset, None when prepare is to build it; raises DataError
    (one line) when it must not or cannot be built there. Writes nothing but a probe object
    (object stores), which it removes."""
    try:
        storage.check_scheme(out, "data.out_dir")
        storage.check_credentials(out, "data.out_dir")
        existing = read_manifest(out)
        if existing is not None:
            if existing.settings == settings:
                return existing
            if not overwrite:
                changed = sorted(k for k in settings if existing.settings.get(k) != settings[k])
                raise DataError(
                    f"data.out_dir: {out!r} holds a dataset prepared with other settings "
                    f"(changed: {', '.join(changed)}); pick another data.out_dir or {hint}"
                )
        elif not overwrite and not _holds_only_ours(out):
            raise DataError(
                f"data.out_dir: {out!r} exists and is not a prepared dataset (no "
                f"{MANIFEST_FILE}); pick another data.out_dir or {hint}"
            )
        storage.check_writable(out, "data.out_dir")
    except storage.StorageError as e:
        raise _storage_error(out, e) from None
    return None


def prepare(cfg: DataConfig, *, overwrite: bool = False, hint: str = OVERWRITE_HINT) -> Manifest:
    """Build the dataset described by cfg in cfg.out_dir (any storage URI) and return its
    manifest.

    Idempotent: an existing out_dir/manifest.json with the same settings is returned as is.
    With other settings (or a non-empty out_dir without manifest) it raises DataError unless
    overwrite=True; so does an out_dir that cannot be reached or written (unknown scheme,
    missing bucket or credentials, unreachable endpoint, read-only location), before anything
    is written. Uses the running Ray instance, or starts (and then stops) a local one.
    The val split is never left without documents when val_fraction > 0 and there are at
    least two documents (see sources.plan_documents); a split that still gets 0 samples
    (too few tokens for one row of seq_len + 1 in any task) raises DataError.
    """
    started = time.perf_counter()
    out = storage.absolute(cfg.out_dir)
    settings = settings_of(cfg)
    existing = _check_out_dir(out, settings, overwrite, hint=hint)
    if existing is not None:
        log.info("%s already holds this dataset", out)
        return existing

    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer)  # fail early on a missing or EOS-less tokenizer
    plan = plan_documents(cfg)
    log.info(
        "%d documents (%s) in %d work units",
        sum(plan.num_documents.values()),
        plan.num_documents,
        len(plan.units),
    )

    import ray

    ray_started = not ray.is_initialized()
    if ray_started:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    try:
        build = _build_remote if storage.is_remote(out) else _build_local
        manifest = build(cfg, plan, settings, out, overwrite, started, hint)
    finally:
        if ray_started:
            ray.shutdown()
    warning = held_out_warning(cfg, manifest)
    if warning:
        log.warning("%s", warning)
    return manifest


def held_out_warning(cfg: DataConfig, manifest: Manifest) -> Optional[str]:
    """One line when a hashed hold-out came out far from data.val_fraction: a val share of the
    tokens (stored plus each task's dropped remainder) off by more than half of val_fraction,
    or no val document. None when the split was given or is close enough."""
    if cfg.split_given or cfg.val_fraction <= 0:
        return None
    tokens = {s: manifest.splits[s].num_tokens + manifest.splits[s].dropped_tokens for s in SPLITS}
    share = tokens["val"] / max(1, sum(tokens.values()))
    docs = manifest.num_documents
    if docs["val"] > 0 and abs(share - cfg.val_fraction) <= cfg.val_fraction / 2:
        return None
    return (
        f"warning: the hashed hold-out put {share:.1%} of the tokens ({docs['val']} of "
        f"{docs['val'] + docs['train']} documents) in val, far from data.val_fraction="
        f"{cfg.val_fraction}: the split hashes document names, not what they say (a file named "
        "*_val* may land in train); name your validation set with data.val_sources=[...] or "
        "data.split_column"
    )


def _build_local(
    cfg: DataConfig,
    plan: Plan,
    settings: dict[str, Any],
    out: str,
    overwrite: bool,
    started: float,
    hint: str = OVERWRITE_HINT,
) -> Manifest:
    """Build in `<out>.tmp-<pid>`, then rename it into place (see _commit)."""
    tmp = Path(f"{out}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        manifest = _build(cfg, plan, settings, str(tmp), prefix="")
        manifest.stats["seconds"] = round(time.perf_counter() - started, 3)
        manifest.save(str(tmp))
        other = _commit(tmp, Path(out), settings)
        return other if other is not None else manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_remote(
    cfg: DataConfig,
    plan: Plan,
    settings: dict[str, Any],
    out: str,
    overwrite: bool,
    started: float,
    hint: str = OVERWRITE_HINT,
) -> Manifest:
    """Build under out/<version>/, commit by writing out/manifest.json, then (overwrite) delete
    what out held before."""
    version = version_of(settings)
    build = storage.join(out, version)
    before = storage.listdir(out)
    try:
        manifest = _build(cfg, plan, settings, build, prefix=f"{version}/")
        manifest.stats["seconds"] = round(time.perf_counter() - started, 3)
        current = read_manifest(out)  # a concurrent prepare may have committed meanwhile
        if current is not None and current.settings == settings:
            return current  # the same files, in the same version prefix
        if current is not None and not overwrite:
            raise DataError(
                f"data.out_dir: {out!r} was prepared with other settings by another prepare "
                f"meanwhile; pick another data.out_dir or {hint}"
            )
        manifest.save(out)
    except BaseException:
        with contextlib.suppress(Exception):
            current = read_manifest(out)
            if current is None or not any(f.startswith(f"{version}/") for f in current.files()):
                storage.delete(build)
        raise
    if overwrite:
        for name in before:
            if name not in (MANIFEST_FILE, version):
                storage.delete(storage.join(out, name))
    return manifest


def _build(
    cfg: DataConfig, plan: Plan, settings: dict[str, Any], build: str, *, prefix: str
) -> Manifest:
    """Write tokenizer.json and the shards into `build` (a storage URI); return the manifest,
    whose file names are `prefix` + the name in `build`. Does not write the manifest."""
    if cfg.tokenizer:
        tok_bytes = read_file(cfg.tokenizer)  # the exact bytes: same sha256
    else:
        trained = train_tokenizer(_train_texts(plan, cfg), cfg.vocab_size)
        tok_bytes = trained.to_str(pretty=True).encode()  # what Tokenizer.save writes
    storage.write_bytes(storage.join(build, TOKENIZER_FILE), tok_bytes)
    tok = Tokenizer.from_str(tok_bytes.decode())

    if cfg.num_tasks:
        num_tasks = cfg.num_tasks
    else:
        num_tasks = min(MAX_AUTO_TASKS, math.ceil(sum(plan.unit_chars) / TASK_CHARS))
    num_tasks = max(1, min(num_tasks, len(plan.units)))
    groups = [[plan.units[i] for i in g] for g in group_units(plan.unit_chars, num_tasks)]
    results = _run_tasks(
        groups,
        {
            "tokenizer_json": tok_bytes.decode(),
            "text_column": cfg.text_column,
            "seq_len": cfg.seq_len,
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
            "split_overrides": plan.split_overrides,
            "samples_per_shard": cfg.samples_per_shard,
            "out_dir": build,
            "split_column": cfg.split_column,
        },
        env=storage.remote_env(other_machines=True) if storage.is_remote(build) else None,
    )
    tok_sha = hashlib.sha256(tok_bytes).hexdigest()
    return _build_manifest(cfg, plan, tok, tok_sha, settings, results, prefix=prefix)


def _build_manifest(
    cfg: DataConfig,
    plan: Plan,
    tok: Tokenizer,
    tok_sha256: str,
    settings: dict[str, Any],
    results: list[dict[str, Any]],
    *,
    prefix: str = "",
) -> Manifest:
    row_len = cfg.seq_len + 1
    splits: dict[str, SplitInfo] = {}
    documents: dict[str, int] = {}
    for split in SPLITS:
        shards = [
            ShardInfo(file=prefix + s["file"], rows=s["rows"])
            for r in results
            for s in r[split]["shards"]
        ]
        num_samples = sum(s.rows for s in shards)
        splits[split] = SplitInfo(
            shards=shards,
            num_samples=num_samples,
            num_tokens=num_samples * row_len,
            dropped_tokens=sum(r[split]["dropped_tokens"] for r in results),
        )
        documents[split] = sum(r[split]["documents"] for r in results)
        if documents[split] != plan.num_documents[split]:
            raise RuntimeError(
                f"{split}: tasks read {documents[split]} documents, the listing found "
                f"{plan.num_documents[split]} (did the sources change while preparing?)"
            )
    for split in SPLITS:
        needed = split == "train" or cfg.split_given or cfg.val_fraction > 0
        if splits[split].num_samples == 0 and needed:
            hashed = split == "val" and not cfg.split_given
            raise DataError(
                f"{split} split has 0 samples: its {documents[split]} documents hold "
                f"{splits[split].dropped_tokens} tokens, less than seq_len + 1 = {row_len} per "
                "task; add documents, lower data.seq_len or data.num_tasks"
                + (", or set data.val_fraction=0" if hashed else "")
            )
    return Manifest(
        version=MANIFEST_VERSION,
        name=cfg.name,
        tokenizer=TokenizerInfo(
            file=prefix + TOKENIZER_FILE,
            sha256=tok_sha256,
            vocab_size=tok.get_vocab_size(),
            eos_id=eos_id(tok),
        ),
        seq_len=cfg.seq_len,
        splits=splits,
        sources=plan.sources,
        num_documents=documents,
        settings=settings,
        fingerprint=_fingerprint(settings),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        stats={
            "num_tasks": len(results),
            "chars": plan.num_chars,
            "split": split_description(cfg),
        },
    )


# ---------------------------------------------------------------------------- command line


def load_data_config(overrides: list[str]) -> DataConfig:
    """cfg.data of conf/ composed with these Hydra overrides, validated on its own: the other
    groups are composed (typed, so a misspelled key still fails) but their rules and the
    cross-group ones (batch sizes, workers, model vocab) are training's business, not prepare's.
    Local out_dir / tokenizer paths are made absolute. ConfigError (composition) or DataError.
    """
    from dataclasses import replace

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config import compose_config

    composed = compose_config(overrides)
    try:
        raw = OmegaConf.to_container(composed.data, resolve=True)
    except OmegaConfBaseException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data: {first}") from None
    data = DataConfig.from_dict(raw)
    return replace(
        data,
        out_dir=storage.absolute(data.out_dir),
        tokenizer=storage.absolute(data.tokenizer) if data.tokenizer else None,
    )


def overridden(overrides: list[str], key: str) -> bool:
    """Whether the command line sets `key` (key=v, +key=v, ++key=v)."""
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides if "=" in o)


def check_vocab_size(cfg: DataConfig, *, explicit: bool) -> None:
    """With a given tokenizer, data.vocab_size is unused; set explicitly to another size than
    the tokenizer's it is refused (the user believes it means something)."""
    if not cfg.tokenizer:
        return
    size = load_tokenizer(cfg.tokenizer).get_vocab_size()
    if explicit and cfg.vocab_size != size:
        raise DataError(
            f"data.vocab_size={cfg.vocab_size} conflicts with data.tokenizer {cfg.tokenizer!r}, "
            f"which has {size} tokens: data.vocab_size sizes the BPE prepare trains; with a "
            f"given tokenizer leave it unset (or set it to {size})"
        )


def main(argv: list[str] | None = None) -> int:
    """python -m data_pipeline.prepare [--overwrite] [overrides]: composes conf/ with Hydra's
    compose API and prepares cfg.data. Errors print one `error: ...` line and return 2."""
    from trainer.config import ConfigError

    args = list(sys.argv[1:] if argv is None else argv)
    overwrite = "--overwrite" in args
    overrides = [a for a in args if a != "--overwrite"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        cfg = load_data_config(overrides)
        check_vocab_size(cfg, explicit=overridden(overrides, "data.vocab_size"))
        try:
            before = read_manifest(cfg.out_dir)
        except (DataError, storage.StorageError):
            before = None  # prepare says what is wrong
        manifest = prepare(cfg, overwrite=overwrite)
    except (DataError, ConfigError, storage.StorageError) as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    tokens = sum(s.num_tokens for s in manifest.splits.values())
    print(f"dataset {manifest.name!r} in {storage.absolute(cfg.out_dir)}")
    for split, info in manifest.splits.items():
        print(
            f"  {split:5s}: {manifest.num_documents[split]:>9,d} documents "
            f"{info.num_tokens:>13,d} tokens {info.num_samples:>10,d} samples "
            f"({len(info.shards)} shards)"
        )
    if before is not None and before.created == manifest.created:
        timing = "already prepared"
    else:
        timing = f"{seconds:.1f} s, {tokens / max(seconds, 1e-9):,.0f} tokens/s"
    print(
        f"  tokenizer vocab {manifest.tokenizer.vocab_size}, seq_len {manifest.seq_len}; " + timing
    )
    if manifest.stats.get("split"):
        print(f"  split: {manifest.stats['split']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
