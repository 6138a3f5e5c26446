"""Tokenize and pack a corpus into Parquet token shards, crash-safe and streaming.

    python -m data_pipeline.prepare [--overwrite] [hydra overrides, e.g. data.seq_len=512]

The command validates the data group only (the run's trainer, model and cluster settings are
not its business; data_pipeline/compose.py composes conf/ for it); an explicit data.vocab_size=
that contradicts a given data.tokenizer is refused.

Steps:
1. The driver lists work units from metadata only (sources.plan_units: file sizes, Parquet
   footers; JSONL files cut into byte ranges, Parquet files into row-group ranges) and groups
   them into tasks of contiguous units. It never reads a document for this.
2. It trains a byte-level BPE on a seeded sample of at most data.tokenizer_sample_bytes of
   train text (`train_texts`: when the sources fit in that budget, the whole train split in
   listing order), or takes data.tokenizer.
3. Ray tasks (1 CPU each, anywhere in the cluster; a single task with no cluster named runs in
   the driver's process instead of on a private Ray) stream their units with bounded memory
   (data.task_memory_bytes), tokenize them (encode_batch_fast), append EOS, pack each split's
   token stream into rows of exactly seq_len + 1 tokens (the task's remainder is dropped) and
   write `{split}-{task:05d}-{k:03d}.parquet` (zstd, one column `tokens` of type
   fixed_size_list<int32>[seq_len + 1], row groups of ROW_GROUP_ROWS rows) straight into the
   build location, then record their result in the ledger (data_pipeline/ledger.py).
4. The driver merges the task results (counts come from the tasks: a split that comes out
   empty is one DataError line naming the remedy) into manifest.json, written last.

The split is the user's when data.val_sources / data.split_column name it, else a hashed
hold-out of data.val_fraction, with a one-line warning when the held-out share of tokens comes
out far from it.

data.out_dir is a storage URI (data_pipeline/storage.py): a local path, a shared mount, s3://
or gs://; a local path must be a mount every Ray node sees. manifest.json is the commit
marker: without it there is no dataset. How a prepare builds and commits:

- local path / shared mount: everything is built in `<out_dir>.partial-<fp16>` (fp16: the
  first 16 hex digits of the settings fingerprint), then the ledger is removed and the
  directory renamed into place (an overwritten dataset is renamed aside first, then removed).
- object store (there is no rename): the files go under a version prefix inside out_dir,
  `v-<fp16>/`, and the manifest names them there (its file names are relative to out_dir).
  Writing manifest.json (one whole object) commits; then the ledger is deleted and, with
  --overwrite, what out_dir held before.

Resume: a prepare killed at any moment (the driver or a task, even with kill -9) leaves its
build location with the ledger. The same command run again reads the plan from the ledger,
keeps the tokenizer and the finished tasks, runs the others (at most the tasks that were in
flight are redone) and ends with the same bytes (shards and manifest) as a run that was never
interrupted: the manifest holds no wall-clock time. A build location of OTHER settings (an
unfinished prepare's ledger) in the way is refused in one line (finish it with its settings, or
--overwrite discards it). A prepare refused for bad input (DataError) removes its build
location: nothing is left of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import storage
from data_pipeline.config import DataConfig, DataError
from data_pipeline.lease import sibling_lease
from data_pipeline.ledger import LEDGER_DIR, Ledger, plan_settings
from data_pipeline.manifest import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    Manifest,
    ShardInfo,
    SplitInfo,
    TokenizerInfo,
    read_manifest,
)
from data_pipeline.order import DEFAULT_CHUNK
from data_pipeline.sources import (
    SPLITS,
    WorkUnit,
    given_split,
    group_units,
    plan_units,
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
TASK_BYTES = 2 << 20  # auto num_tasks: about this much source per task
MAX_AUTO_TASKS = 4096
UNIT_BYTES = 64 << 20  # JSONL / Parquet units of about this much (at most task memory / 4)
ENCODE_BATCH = 64  # documents per encode_batch call (fewer when they are long)
# Rows per Parquet row group of a shard: the loader reads by row group, and the data order's
# default chunk is one row group (a step's samples come from few of them).
ROW_GROUP_ROWS = DEFAULT_CHUNK
VERSION_PREFIX = re.compile(r"v-[0-9a-f]{16}")  # object stores: where one version's files live
PARTIAL = ".partial-"  # local: <out_dir>.partial-<fp16> is a build in progress
# Test drills (unset outside tests): the driver SIGKILLs itself at a named point, or task k
# SIGKILLs its worker process once (the marker file makes it once) after its first shard.
KILL_ENV = "RAYGPT_PREPARE_KILL"  # listed | tokenizer | task | tasks | manifest
KILL_TASK_ENV = "RAYGPT_PREPARE_KILL_TASK"  # "<task>:<marker file>"
KILL_POINTS = ("listed", "tokenizer", "task", "tasks", "manifest")


def kill_point(name: str) -> None:
    """SIGKILL this process when RAYGPT_PREPARE_KILL names this point (a test drill)."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _kill_task(task: int) -> None:
    spec = os.environ.get(KILL_TASK_ENV)
    if not spec:
        return
    k, marker = spec.split(":", 1)
    if int(k) == task and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------- settings

_AT_SCALE = ("tokenizer_sample_bytes", "task_memory_bytes")


def settings_of(cfg: DataConfig) -> dict[str, Any]:
    """The settings that decide a dataset's content (compared to find an existing one).
    val_sources, split_column and the scale settings appear only when set (not default), so
    that datasets prepared before they existed keep their settings."""
    given: dict[str, Any] = {}
    if cfg.val_sources:
        given["val_sources"] = list(cfg.val_sources)
    if cfg.split_column is not None:
        given["split_column"] = cfg.split_column
    for key in _AT_SCALE:
        if getattr(cfg, key) != DataConfig.__dataclass_fields__[key].default:
            given[key] = getattr(cfg, key)
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


def partial_dir(out: str, settings: dict[str, Any]) -> str:
    """Where a local prepare with these settings builds (deterministic: a rerun finds it)."""
    return f"{out}{PARTIAL}{_fingerprint(settings)[:16]}"


def unit_bytes(cfg: DataConfig) -> int:
    """The size the listing cuts JSONL / Parquet files into."""
    return max(1, min(UNIT_BYTES, cfg.task_memory_bytes // 4))


# ---------------------------------------------------------------------------- one task


class _ShardWriter:
    """Packs one split's token stream of one task into rows and writes full shards."""

    def __init__(self, out_dir: str, split: str, task: int, seq_len: int, rows_per_shard: int):
        self.out_dir = out_dir  # any storage URI
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
        # From the buffer: pa.array() on a numpy array imports pandas (0.7 s per worker).
        tokens = np.ascontiguousarray(flat[:take], dtype=np.int32)
        values = pa.Array.from_buffers(pa.int32(), take, [None, pa.py_buffer(tokens)])
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, self.row_len)})
        name = f"{self.split}-{self.task:05d}-{len(self.shards):03d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        data = sink.getvalue().to_pybytes()
        storage.write_bytes(storage.join(self.out_dir, name), data)  # whole, never half
        self.shards.append({"file": name, "rows": rows, "sha256": hashlib.sha256(data).hexdigest()})
        self.pending = [flat[take:]]
        self.pending_tokens -= take
        _kill_task(self.task)


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(tokenizer_json: str) -> Tokenizer:
    """The parsed tokenizer, once per worker process (Ray reuses workers across tasks)."""
    key = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    return _TOKENIZERS[key]


def tokenize_task(
    task: int,
    units: list[dict[str, Any]],
    *,
    tokenizer_json: str,
    text_column: str,
    seq_len: int,
    val_fraction: float,
    seed: int,
    samples_per_shard: int,
    out_dir: str,
    split_column: Optional[str] = None,
    memory_bytes: int = 2 << 30,
) -> dict[str, Any]:
    """One Ray task: stream, tokenize and pack one group of work units, write its shards into
    out_dir (any storage URI), record its result in the ledger there and return it: {"task",
    and per split: shards (names relative to out_dir, rows, sha256), documents, chars, bytes
    (UTF-8), dropped_tokens}. Bad input is returned as {"task", "error": one line}, not raised (Ray
    would wrap it in a traceback), and records nothing."""
    try:
        result = _tokenize(task, [WorkUnit(**u) for u in units], tokenizer_json, text_column,
                           seq_len, val_fraction, seed, samples_per_shard, out_dir, split_column,
                           memory_bytes)  # fmt: skip
    except DataError as exc:
        return {"task": task, "error": str(exc)}
    Ledger(out_dir).record(task, result)
    return result


def _tokenize(
    task, units, tokenizer_json, text_column, seq_len, val_fraction, seed, samples_per_shard,
    out_dir, split_column, memory_bytes,
) -> dict[str, Any]:  # fmt: skip
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per task, side by side
    tok = _tokenizer(tokenizer_json)
    eos = eos_id(tok)
    # encode_batch_fast: the same ids without character offsets (~1.3x faster on 1 thread).
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    writers = {s: _ShardWriter(out_dir, s, task, seq_len, samples_per_shard) for s in SPLITS}
    documents, chars = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    num_bytes = dict.fromkeys(SPLITS, 0)  # UTF-8 bytes: the unit of bits per byte
    batches: dict[str, list[str]] = {s: [] for s in SPLITS}
    batch_chars = dict.fromkeys(SPLITS, 0)
    max_batch_chars = max(1, memory_bytes // 16)

    def flush(split: str) -> None:
        for enc in encode_batch(batches[split], add_special_tokens=False):
            ids = np.empty(len(enc.ids) + 1, dtype=np.int32)
            ids[:-1] = enc.ids
            ids[-1] = eos
            writers[split].add(ids)
        batches[split].clear()
        batch_chars[split] = 0

    for unit in units:
        for doc in read_documents(unit, text_column, split_column, memory_bytes // 4):
            split = split_for(doc, unit, val_fraction, seed)
            batches[split].append(doc.text)
            documents[split] += 1
            chars[split] += len(doc.text)
            num_bytes[split] += len(doc.text.encode("utf-8", "surrogatepass"))
            batch_chars[split] += len(doc.text)
            if len(batches[split]) >= ENCODE_BATCH or batch_chars[split] >= max_batch_chars:
                flush(split)
    result: dict[str, Any] = {"task": task}
    for split in SPLITS:
        flush(split)
        writers[split].finish()
        result[split] = {
            "shards": writers[split].shards,
            "documents": documents[split],
            "chars": chars[split],
            "bytes": num_bytes[split],
            "dropped_tokens": writers[split].dropped_tokens,
        }
    _kill_task(task)
    return result


# ---------------------------------------------------------------------------- the driver


def train_texts(units: list[WorkUnit], cfg: DataConfig) -> Iterator[str]:
    """The tokenizer's training text: train documents, at most cfg.tokenizer_sample_bytes
    (UTF-8). When the sources fit in that budget: every unit in listing order (the whole train
    split, as prepare always trained on); else whole units in a seeded order until the budget
    is spent (a bounded sample: the driver reads only that much)."""
    budget = cfg.tokenizer_sample_bytes
    candidates = [u for u in units if u.split != "val"]
    if sum(u.size for u in candidates) > budget:
        candidates.sort(
            key=lambda u: hashlib.sha256(f"{cfg.seed}\0{u.name}\0{u.start}".encode()).digest()
        )
    taken = 0
    for unit in candidates:
        for doc in read_documents(unit, cfg.text_column, cfg.split_column):
            if split_for(doc, unit, cfg.val_fraction, cfg.seed) != "train":
                continue
            size = len(doc.text.encode("utf-8"))
            if taken + size > budget:
                return
            taken += size
            yield doc.text


def build_location(out: str, settings: dict[str, Any]) -> str:
    """Where a prepare of these settings builds: `<out>.partial-<fp16>` (local) or
    `<out>/v-<fp16>` (object stores)."""
    if storage.is_remote(out):
        return storage.join(out, version_of(settings))
    return partial_dir(out, settings)


def make_plan(cfg: DataConfig, settings: dict[str, Any], build: str) -> dict[str, Any]:
    """The plan in the ledger under `build` (a rerun), or a new one from the listing (metadata
    only; bad input raises DataError here, before Ray starts). Not written here."""
    plan = Ledger(build).read_plan()
    if plan is not None and plan.get("settings") == settings:
        log.info("resuming: the plan of %d tasks from the ledger", len(plan["tasks"]))
        return plan
    listing = plan_units(cfg, unit_bytes(cfg))
    sizes = [u.size for u in listing.units]
    if cfg.num_tasks:
        num_tasks = cfg.num_tasks
    else:
        num_tasks = min(MAX_AUTO_TASKS, math.ceil(sum(sizes) / TASK_BYTES))
    num_tasks = max(1, min(num_tasks, len(listing.units)))
    groups = [[asdict(listing.units[i]) for i in g] for g in group_units(sizes, num_tasks)]
    plan = {
        "fingerprint": _fingerprint(settings),
        "settings": settings,
        "sources": listing.sources,
        "tasks": groups,
    }
    log.info("%d work units (%d bytes) in %d tasks", len(sizes), sum(sizes), len(groups))
    return plan


def _tokenizer_bytes(cfg: DataConfig, build: str, units: list[WorkUnit]) -> bytes:
    """tokenizer.json's bytes: the one already in the build (a rerun), data.tokenizer's exact
    bytes, or a BPE trained on train_texts; written into the build before any task starts."""
    uri = storage.join(build, TOKENIZER_FILE)
    if storage.is_file(uri):
        return storage.read_bytes(uri)
    if cfg.tokenizer:
        data = read_file(cfg.tokenizer)  # the exact bytes: same sha256
    else:
        trained = train_tokenizer(train_texts(units, cfg), cfg.vocab_size)
        data = trained.to_str(pretty=True).encode()  # what Tokenizer.save writes
    storage.write_bytes(uri, data)
    return data


def _run_tasks(
    tasks: dict[int, list[dict[str, Any]]],
    fn_kwargs: dict[str, Any],
    env: Optional[dict[str, str]] = None,
) -> dict[int, dict[str, Any]]:
    """tokenize_task over every given task as plain Ray tasks (1 CPU each); their results by
    task index. After a task's bad-input error, the tasks not started are cancelled and the
    others waited for (none may write into a build location being removed).

    Ray core tasks rather than a Ray Data map: the tasks are independent and coarse, and Ray
    Data's streaming executor added only start-up time. The arguments are put into the object
    store once and shared by every task. `env`: extra environment of the tasks (the driver's
    object-store settings when writing to one). One task and no cluster named: it runs here."""
    if not tasks:
        return {}  # all done (a rerun): no Ray needed
    if runs_here(len(tasks)):
        return _run_here(tasks, fn_kwargs)
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    try:
        return _run_on_ray(tasks, fn_kwargs, env)
    finally:
        if started:
            ray.shutdown()


def runs_here(num_tasks: int) -> bool:
    """Whether prepare runs its tasks in this process rather than on Ray: one task, and no
    cluster named (this process is not connected to one, RAY_ADDRESS names none), where a
    private local Ray would only add its start (10-15 s on 2 cores) to the work."""
    if num_tasks != 1 or os.environ.get("RAY_ADDRESS"):
        return False
    ray = sys.modules.get("ray")
    return ray is None or not ray.is_initialized()


def _run_here(
    tasks: dict[int, list[dict[str, Any]]], fn_kwargs: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    """The one task (runs_here), in this process."""
    ((k, units),) = tasks.items()
    result = tokenize_task(k, units, **fn_kwargs)
    if "error" not in result:
        kill_point("task")
    return {k: result}


def _run_on_ray(
    tasks: dict[int, list[dict[str, Any]]],
    fn_kwargs: dict[str, Any],
    env: Optional[dict[str, str]],
) -> dict[int, dict[str, Any]]:
    import ray

    shared = ray.put(fn_kwargs)
    remote = ray.remote(num_cpus=1, max_retries=3)(_remote_task)
    if env:
        remote = remote.options(runtime_env={"env_vars": env})
    refs = {remote.remote(k, units, shared): k for k, units in sorted(tasks.items())}
    results: dict[int, dict[str, Any]] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        result = ray.get(ready[0])
        results[refs[ready[0]]] = result
        if "error" in result:
            for ref in pending:
                ray.cancel(ref)
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.get(ref)
            break
        kill_point("task")
    return results


def _remote_task(task: int, units: list[dict[str, Any]], fn_kwargs: dict[str, Any]):
    return tokenize_task(task, units, **fn_kwargs)


def _build(
    cfg: DataConfig, settings: dict[str, Any], plan: dict[str, Any], build: str, *, prefix: str
) -> Manifest:
    """The plan (into the ledger), tokenizer and shards in `build` (a storage URI), resuming
    from its ledger; returns the manifest, whose file names are `prefix` + the name in `build`
    (not written here)."""
    ledger = Ledger(build)
    if ledger.read_plan() != plan:
        ledger.write_plan(plan)
    kill_point("listed")
    groups = [[WorkUnit(**u) for u in g] for g in plan["tasks"]]
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer)  # fail early on a missing or EOS-less tokenizer
    tok_bytes = _tokenizer_bytes(cfg, build, [u for g in groups for u in g])
    kill_point("tokenizer")
    done = ledger.done()
    todo = {k: plan["tasks"][k] for k in range(len(groups)) if k not in done}
    if done:
        log.info("%d of %d tasks already done (ledger)", len(done), len(groups))
    fn_kwargs = {
        "tokenizer_json": tok_bytes.decode(),
        "text_column": cfg.text_column,
        "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "samples_per_shard": cfg.samples_per_shard,
        "out_dir": build,
        "split_column": cfg.split_column,
        "memory_bytes": cfg.task_memory_bytes,
    }
    env = storage.remote_env(other_machines=True) if storage.is_remote(build) else None
    ran = _run_tasks(todo, fn_kwargs, env)
    errors = [r["error"] for _, r in sorted(ran.items()) if "error" in r]
    if errors:
        raise DataError(errors[0])  # the first in task order
    done.update(ran)
    kill_point("tasks")
    results = [done[k] for k in range(len(groups))]
    tok = Tokenizer.from_str(tok_bytes.decode())
    tok_sha = hashlib.sha256(tok_bytes).hexdigest()
    return _build_manifest(cfg, plan["sources"], tok, tok_sha, settings, results, prefix=prefix)


def _check_documents(cfg: DataConfig, sources: list[str], documents: dict[str, int]) -> None:
    """Every split the run needs has documents; else one DataError line with the remedy."""
    total = sum(documents.values())
    if total == 0:
        raise DataError(f"data.sources matched no documents (after dropping empty ones): {sources}")
    if cfg.split_given:
        for split in SPLITS:
            if documents[split] == 0:
                raise DataError(f"{split} split has 0 documents: {given_split(cfg)}")
        return
    if cfg.val_fraction > 0 and 0 in documents.values():
        empty = "val" if documents["val"] == 0 else "train"
        raise DataError(
            f"{empty} split has 0 documents: the hashed hold-out of data.val_fraction="
            f"{cfg.val_fraction} (data.seed={cfg.seed}) put {documents['val']} of the {total} "
            "documents in val; name a validation set with data.val_sources=[...] or "
            "data.split_column, change data.val_fraction, or set data.val_fraction=0"
        )


def _sum_or_none(values: Iterator[Optional[int]]) -> Optional[int]:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _build_manifest(
    cfg: DataConfig,
    sources: list[str],
    tok: Tokenizer,
    tok_sha256: str,
    settings: dict[str, Any],
    results: list[dict[str, Any]],
    *,
    prefix: str = "",
) -> Manifest:
    row_len = cfg.seq_len + 1
    splits: dict[str, SplitInfo] = {}
    documents = {s: sum(r[s]["documents"] for r in results) for s in SPLITS}
    _check_documents(cfg, sources, documents)
    for split in SPLITS:
        shards = [
            ShardInfo(file=prefix + s["file"], rows=s["rows"], sha256=s["sha256"])
            for r in results
            for s in r[split]["shards"]
        ]
        num_samples = sum(s.rows for s in shards)
        splits[split] = SplitInfo(
            shards=shards,
            num_samples=num_samples,
            num_tokens=num_samples * row_len,
            dropped_tokens=sum(r[split]["dropped_tokens"] for r in results),
            # None if a ledger of an older prepare holds results without it
            num_bytes=_sum_or_none(r[split].get("bytes") for r in results),
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
        sources=sources,
        num_documents=documents,
        settings=settings,
        fingerprint=_fingerprint(settings),
        stats={
            "num_tasks": len(results),
            "chars": {s: sum(r[s]["chars"] for r in results) for s in SPLITS},
            "split": split_description(cfg),
        },
    )


# ---------------------------------------------------------------------------- out_dir


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


def other_builds(out: str, settings: dict[str, Any], named: tuple[str, ...] = ()) -> list[str]:
    """Build locations of unfinished prepares with OTHER settings (a ledger in them): local
    `<out>.partial-<fp16>` siblings, object-store version prefixes that no manifest names."""
    ours = _fingerprint(settings)[:16]
    if storage.is_remote(out):
        names = [n for n in storage.listdir(out) if VERSION_PREFIX.fullmatch(n)]
        found = [storage.join(out, n) for n in names if n[2:] != ours and n not in named]
    else:
        parent, base = Path(out).parent, Path(out).name + PARTIAL
        found = [
            str(p)
            for p in (sorted(parent.glob(f"{base}*")) if parent.is_dir() else [])
            if re.fullmatch(r"[0-9a-f]{16}", p.name[len(base) :]) and p.name[len(base) :] != ours
        ]
    return [b for b in found if plan_settings(b) is not None]


def _check_ledgers(out: str, settings: dict[str, Any], named: tuple[str, ...], hint: str) -> None:
    for build in other_builds(out, settings, named):
        theirs = plan_settings(build) or {}
        changed = sorted(k for k in {*settings, *theirs} if theirs.get(k) != settings.get(k))
        raise DataError(
            f"data.out_dir: {build!r} holds the ledger of an unfinished prepare with other "
            f"settings (changed: {', '.join(changed)}); finish it by running that prepare "
            f"again, pick another data.out_dir, or {hint} to discard it"
        )


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
    (one line) when it must not or cannot be built there (another dataset, something else,
    an unfinished prepare of other settings). Writes nothing but a probe object (object
    stores), which it removes."""
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
        if not overwrite:
            named = tuple({f.split("/", 1)[0] for f in existing.files()} if existing else ())
            _check_ledgers(out, settings, named, hint)
        storage.check_writable(out, "data.out_dir")
    except storage.StorageError as e:
        raise _storage_error(out, e) from None
    return None


# What a prepare refused because another prepare writes the same out_dir can do.
PREPARE_REMEDY = "or use another data.out_dir"


def prepare(
    cfg: DataConfig,
    *,
    overwrite: bool = False,
    hint: str = OVERWRITE_HINT,
    planned: Optional[PlannedPrepare] = None,
) -> Manifest:
    """Build the dataset described by cfg in cfg.out_dir (any storage URI) and return its
    manifest; resumes an interrupted prepare of the same settings from its ledger.

    Idempotent: an existing out_dir/manifest.json with the same settings is returned as is.
    With other settings (or a non-empty out_dir without manifest, or the ledger of an
    unfinished prepare with other settings) it raises DataError unless overwrite=True; so does
    an out_dir that cannot be reached or written (unknown scheme, missing bucket or
    credentials, unreachable endpoint, read-only location), before anything is written. Uses
    the running Ray instance, or starts (and then stops) a local one while tasks are to run
    (none are on a rerun whose tasks are all done; a single task runs in this process). A
    split that comes out without documents, or with 0 samples (too few tokens for one row of
    seq_len + 1 in any task), raises DataError.

    planned: what plan_prepare(cfg, ...) returned (a caller that checks before starting Ray).
    """
    planned = planned or plan_prepare(cfg, overwrite=overwrite, hint=hint)
    out, settings = planned.out, planned.settings
    if planned.existing is not None:
        log.info("%s already holds this dataset", out)
        if storage.is_remote(out):  # killed between its manifest and the ledger's removal
            Ledger(storage.join(out, version_of(settings))).remove()
        return planned.existing
    build = _build_remote if storage.is_remote(out) else _build_local
    with sibling_lease(out, f"prepare of {out}", remedy=PREPARE_REMEDY):  # one writer
        current = read_manifest(out)  # another prepare finished it while we planned
        if current is not None and current.settings == settings and not planned.overwrite:
            return current
        manifest = build(cfg, settings, planned.plan, out, planned.overwrite)
    warning = held_out_warning(cfg, manifest)
    if warning:
        log.warning("%s", warning)
    return manifest


@dataclass(frozen=True)
class PlannedPrepare:
    """What prepare() will do, found from metadata alone: the dataset already there
    (`existing`), or the plan of tasks to run."""

    out: str
    settings: dict[str, Any]
    overwrite: bool
    existing: Optional[Manifest] = None
    plan: Optional[dict[str, Any]] = None

    @property
    def runs_here(self) -> bool:
        """Its tasks would run in this process (runs_here): nothing is there yet, one task."""
        return self.existing is None and runs_here(len(self.plan["tasks"]))


def plan_prepare(
    cfg: DataConfig, *, overwrite: bool = False, hint: str = OVERWRITE_HINT
) -> PlannedPrepare:
    """Everything prepare() checks before its first task, without Ray and without writing:
    out_dir (reachable, writable, its manifest or ledger of these settings), data.tokenizer,
    and the listing of the sources (metadata only: missing files, a Parquet file without the
    text column, damaged footers, unsplittable files over the task budget raise DataError)."""
    out = storage.absolute(cfg.out_dir)
    settings = settings_of(cfg)
    existing = _check_out_dir(out, settings, overwrite, hint=hint)
    if existing is not None:
        return PlannedPrepare(out, settings, overwrite, existing=existing)
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer)  # fail early on a missing or EOS-less tokenizer
    try:
        plan = make_plan(cfg, settings, build_location(out, settings))
    except storage.StorageError as e:
        raise _storage_error(out, e) from None
    return PlannedPrepare(out, settings, overwrite, plan=plan)


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


def _tidy_local(build: Path) -> None:
    """Before the rename: no ledger, no temp file of a killed write."""
    shutil.rmtree(build / LEDGER_DIR, ignore_errors=True)
    for stray in build.glob(".*.tmp"):
        stray.unlink()


def _build_local(
    cfg: DataConfig, settings: dict[str, Any], plan: dict[str, Any], out: str, overwrite: bool
) -> Manifest:
    """Build in `<out>.partial-<fp16>` (resuming what a killed run left there), write the
    manifest into it, then rename it into place (see _commit)."""
    build = Path(partial_dir(out, settings))
    try:
        build.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(build)  # a run killed after its manifest, before the rename
        if manifest is None or manifest.settings != settings:
            manifest = _build(cfg, settings, plan, str(build), prefix="")
            manifest.save(str(build))
        kill_point("manifest")
        _tidy_local(build)
        other = _commit(build, Path(out), settings)
    except DataError:
        shutil.rmtree(build, ignore_errors=True)  # bad input: nothing is left of this prepare
        raise
    if overwrite:
        for stale in other_builds(out, settings):
            shutil.rmtree(stale, ignore_errors=True)
    return other if other is not None else manifest


def _build_remote(
    cfg: DataConfig, settings: dict[str, Any], plan: dict[str, Any], out: str, overwrite: bool
) -> Manifest:
    """Build under out/<version>/ (resuming its ledger), commit by writing out/manifest.json,
    then delete the ledger and (overwrite) what out held before."""
    version = version_of(settings)
    build = storage.join(out, version)
    before = storage.listdir(out)
    try:
        manifest = _build(cfg, settings, plan, build, prefix=f"{version}/")
        current = read_manifest(out)  # a concurrent prepare may have committed meanwhile
        if current is not None and current.settings == settings:
            return current  # the same files, in the same version prefix
        if current is not None and not overwrite:
            raise DataError(
                f"data.out_dir: {out!r} was prepared with other settings by another prepare "
                f"meanwhile; pick another data.out_dir or {OVERWRITE_HINT}"
            )
        manifest.save(out)
    except DataError:
        with contextlib.suppress(Exception):
            current = read_manifest(out)
            if current is None or not any(f.startswith(f"{version}/") for f in current.files()):
                storage.delete(build)  # bad input: nothing is left of this prepare
        raise
    kill_point("manifest")
    Ledger(build).remove()
    if overwrite:
        for name in before:
            if name not in (MANIFEST_FILE, version):
                storage.delete(storage.join(out, name))
    return manifest


# ---------------------------------------------------------------------------- command line


def load_data_config(overrides: list[str]) -> DataConfig:
    """cfg.data of conf/ composed with these Hydra overrides (the same command line as
    training's), validated on its own. Composed with the model and data schemas only
    (data_pipeline/compose.py): a data.* or model.* key is typed and checked; the other groups
    (trainer, optim, ...), their rules and the cross-group ones (batch sizes, workers, model
    vocab) are training's business, not prepare's. Local out_dir / tokenizer paths are made
    absolute. Makes the `storage` group this process's storage policy (storage.configure).
    DataError (composition included)."""
    from dataclasses import replace

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from data_pipeline.compose import compose
    from models.config import GPTConfig

    # model: data.vocab_size and data.seq_len of some data files are ${model.*} interpolations
    schema = {"model": GPTConfig, "data": DataConfig, "storage": storage.StorageConfig}
    composed = compose(overrides, schema, error=DataError, others_as_given=True)
    try:
        raw_storage = OmegaConf.to_container(composed.storage, resolve=True)
        storage.configure(storage.StorageConfig(**raw_storage))
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        raise DataError(f"storage: {storage.one_line(e)}") from None
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


# What a failed prepare leaves (data_pipeline/failures.py's line): every file is written whole
# (storage.write_bytes), the ledger records each finished task, the manifest comes last.
PREPARE_SAFE = (
    "no manifest was written, so nothing half-done will be used; the finished shards are kept "
    "in the ledger and a rerun resumes from them"
)


def main(argv: list[str] | None = None) -> int:
    """python -m data_pipeline.prepare [--overwrite] [overrides]: composes conf/ with Hydra's
    compose API and prepares cfg.data. Errors print one `error: ...` line and return 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    overwrite = "--overwrite" in args
    overrides = [a for a in args if a != "--overwrite"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    cfg = None
    try:
        cfg = load_data_config(overrides)
        if cfg.mixture:
            raise DataError(
                "data.mixture: a mixture is made of datasets prepared one at a time; prepare "
                "each source (data.sources, data.out_dir) without data.mixture, then train "
                "with it"
            )
        check_vocab_size(cfg, explicit=overridden(overrides, "data.vocab_size"))
        try:
            before = read_manifest(cfg.out_dir)
        except (DataError, storage.StorageError):
            before = None  # prepare says what is wrong
        manifest = prepare(cfg, overwrite=overwrite)
    except (DataError, storage.StorageError, OSError) as exc:
        from data_pipeline.failures import describe

        line = describe(exc, safe=PREPARE_SAFE, where=cfg.out_dir if cfg else None)
        if line is None and not isinstance(exc, (DataError, storage.StorageError)):
            raise  # a bug: its traceback
        message = " ".join((line or str(exc)).split())
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
    if before is not None and before.cache_key == manifest.cache_key:
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
