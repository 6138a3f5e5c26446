"""Where documents come from: the built-in stdlib corpus or user paths / globs / fsspec URLs.

Listing is cheap and gives *work units* (a file, its format and a row range) that a Ray task can
read on its own; `read_documents` turns one unit into documents. Every document has a stable id
(`<name>` for a text file, `<name>#<row>` for a JSONL line or Parquet row, where `<name>` is the
file's path relative to its source root), and the train/val split is a seeded hash of that id.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from data_pipeline.config import DataConfig, DataError

SPLITS = ("train", "val")
TEXT_EXTENSIONS = frozenset(
    ".txt .text .md .rst .py .pyi .c .h .cc .cpp .hpp .js .ts .java .go .rs .sh .tex .html "
    ".css .json .toml .yaml .yml".split()
)
JSONL_EXTENSIONS = frozenset({".jsonl", ".ndjson"})
PARQUET_EXTENSIONS = frozenset({".parquet", ".pq"})
KNOWN_EXTENSIONS = TEXT_EXTENSIONS | JSONL_EXTENSIONS | PARQUET_EXTENSIONS
# JSONL / Parquet files are cut into units of about this much text so that one big file can
# still be tokenized by several tasks.
UNIT_CHARS = 4 << 20
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Document:
    id: str  # stable: used for the train/val split hash
    text: str
    row: int = 0  # line (JSONL) or row (Parquet) index within its file; 0 for text files


@dataclass(frozen=True)
class WorkUnit:
    """A file (or a row range of one) that one task reads; plain fields so it pickles/JSONs."""

    path: str  # absolute local path or fsspec URL
    format: str  # text | jsonl | parquet
    name: str  # path relative to its source root; the base of document ids
    start: int = 0  # first row (JSONL line / Parquet row) to read
    stop: int | None = None  # one past the last row to read; None -> to the end


@dataclass
class Plan:
    """Result of one listing pass over all documents (see `plan_documents`)."""

    units: list[WorkUnit]  # non-empty units, cut at max_documents, big files split by rows
    unit_chars: list[int]  # characters of text in each unit, for balancing tasks
    split_overrides: dict[str, str] = field(default_factory=dict)  # doc id -> split (fallback)
    num_documents: dict[str, int] = field(default_factory=dict)
    num_chars: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # what was read, for the manifest


# ---------------------------------------------------------------------------- the stdlib corpus


def stdlib_root() -> str:
    """The running interpreter's standard library directory."""
    return sysconfig.get_paths()["stdlib"]


def _is_test_dir(part: str) -> bool:
    return part.startswith("test") or part.endswith(("_test", "_tests"))


def list_stdlib_files(root: str | None = None) -> list[str]:
    """Sorted absolute paths of the stdlib's *.py files, without tests, site-packages and
    files that are not valid UTF-8."""
    root = root or stdlib_root()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d
            for d in dirnames
            if not _is_test_dir(d)
            and d not in ("site-packages", "dist-packages", "__pycache__")
            and not d.startswith(".")
        ]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = os.path.join(dirpath, name)
            try:
                Path(path).read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            found.append(path)
    return sorted(found)


# ---------------------------------------------------------------------------- listing


def format_of(path: str, configured: str = "auto") -> str:
    """The format a file is read as: the configured one, or by extension (default text)."""
    if configured != "auto":
        return configured
    ext = posixpath.splitext(path)[1].lower()
    if ext in JSONL_EXTENSIONS:
        return "jsonl"
    if ext in PARQUET_EXTENSIONS:
        return "parquet"
    return "text"


def _glob_base(pattern: str) -> str:
    """The directory part of a glob before its first wildcard."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if _GLOB_CHARS.search(part):
            return "/".join(parts[:i]) or "/"
    return posixpath.dirname(pattern)


def _expand_source(source: str, configured_format: str) -> list[WorkUnit]:
    is_url = "://" in source
    spec = source if is_url else os.path.expanduser(source)
    fs, root = fsspec.core.url_to_fs(spec)
    root = root.rstrip("/") or "/"
    if _GLOB_CHARS.search(root):
        base = _glob_base(root)
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
        if not paths:
            raise DataError(f"data.sources: pattern {source!r} matched no files")
    elif fs.isdir(root):
        base = root
        paths = sorted(
            p
            for p in fs.find(root)
            if posixpath.splitext(p)[1].lower() in KNOWN_EXTENSIONS
            and not any(part.startswith(".") for part in posixpath.relpath(p, root).split("/"))
        )
        if not paths:
            raise DataError(
                f"data.sources: directory {source!r} holds no files with a known extension "
                f"({', '.join(sorted(KNOWN_EXTENSIONS))})"
            )
    elif fs.isfile(root):
        base = posixpath.dirname(root)
        paths = [root]
    else:
        raise DataError(f"data.sources: path {source!r} does not exist")
    local = isinstance(fs, LocalFileSystem)
    return [
        WorkUnit(
            path=fs.unstrip_protocol(p) if is_url or not local else p,
            format=format_of(p, configured_format),
            name=posixpath.relpath(p, base),
        )
        for p in paths
    ]


def list_work_units(cfg: DataConfig) -> list[WorkUnit]:
    """All files of cfg.sources (or the stdlib corpus when empty), in a stable order:
    source by source, sorted within a source, a file matched twice kept once."""
    if not cfg.sources:
        root = stdlib_root()
        return [
            WorkUnit(path=p, format="text", name=Path(p).relative_to(root).as_posix())
            for p in list_stdlib_files(root)
        ]
    units: list[WorkUnit] = []
    seen: set[str] = set()
    for source in cfg.sources:
        for unit in _expand_source(source, cfg.format):
            if unit.path not in seen:
                seen.add(unit.path)
                units.append(unit)
    return units


# ---------------------------------------------------------------------------- reading


def _is_empty(text: str | None) -> bool:
    return text is None or not text.strip()


def _read_text(unit: WorkUnit) -> Iterator[Document]:
    if unit.start > 0 or (unit.stop is not None and unit.stop < 1):
        return
    with fsspec.open(unit.path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"text file {unit.path!r} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    if not _is_empty(text):
        yield Document(id=unit.name, text=text, row=0)


def _read_jsonl(unit: WorkUnit, text_column: str) -> Iterator[Document]:
    with fsspec.open(unit.path, "rb") as f:
        for row, line in enumerate(f):
            if row < unit.start:
                continue
            if unit.stop is not None and row >= unit.stop:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                msg = getattr(exc, "msg", str(exc))
                raise DataError(
                    f"jsonl file {unit.path!r} line {row + 1}: invalid JSON ({msg})"
                ) from None
            if not isinstance(obj, dict) or text_column not in obj:
                fields = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(
                    f"jsonl file {unit.path!r} line {row + 1} has no field {text_column!r} "
                    f"(fields: {fields})"
                )
            text = obj[text_column]
            if text is not None and not isinstance(text, str):
                raise DataError(
                    f"jsonl file {unit.path!r} line {row + 1}: field {text_column!r} is "
                    f"{type(text).__name__}, not a string"
                )
            if not _is_empty(text):
                yield Document(id=f"{unit.name}#{row}", text=text, row=row)


def _read_parquet(unit: WorkUnit, text_column: str) -> Iterator[Document]:
    with fsspec.open(unit.path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if text_column not in names:
            raise DataError(
                f"parquet file {unit.path!r} has no column {text_column!r} "
                f"(columns: {', '.join(names)})"
            )
        col_type = pf.schema_arrow.field(text_column).type
        if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
            raise DataError(
                f"parquet file {unit.path!r}: column {text_column!r} has type {col_type}, "
                "not string"
            )
        row = 0
        for batch in pf.iter_batches(columns=[text_column], batch_size=4096):
            n = batch.num_rows
            if row + n <= unit.start:
                row += n
                continue
            for text in batch.column(0).to_pylist():
                if unit.stop is not None and row >= unit.stop:
                    return
                if row >= unit.start and not _is_empty(text):
                    yield Document(id=f"{unit.name}#{row}", text=text, row=row)
                row += 1


def read_documents(unit: WorkUnit, text_column: str = "text") -> Iterator[Document]:
    """The non-empty documents of one work unit, in file order."""
    if unit.format == "text":
        yield from _read_text(unit)
    elif unit.format == "jsonl":
        yield from _read_jsonl(unit, text_column)
    elif unit.format == "parquet":
        yield from _read_parquet(unit, text_column)
    else:
        raise DataError(f"work unit {unit.path!r}: unknown format {unit.format!r}")


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """All non-empty documents of cfg, in listing order, at most cfg.max_documents."""
    count = 0
    for unit in list_work_units(cfg):
        for doc in read_documents(unit, cfg.text_column):
            if cfg.max_documents is not None and count >= cfg.max_documents:
                return
            count += 1
            yield doc


# ---------------------------------------------------------------------------- train/val split


def split_score(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) from a seeded hash of the document id."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(doc_id: str, val_fraction: float, seed: int) -> str:
    """'val' for about val_fraction of the document ids, else 'train'."""
    return "val" if split_score(doc_id, seed) < val_fraction else "train"


def plan_documents(cfg: DataConfig) -> Plan:
    """Read every document once (no tokenizing): validate the input, apply max_documents,
    count documents per split and cut big files into row ranges.

    Split fallback: with val_fraction > 0 and at least two documents, if the hash puts no
    document in val, the train document with the lowest hash score is held out (and likewise
    one goes back to train if all landed in val). Raises DataError when there is no document.
    """
    units: list[WorkUnit] = []
    unit_chars: list[int] = []
    counts = dict.fromkeys(SPLITS, 0)
    chars = dict.fromkeys(SPLITS, 0)
    lowest_train: tuple[float, str, int] = (math.inf, "", 0)  # (score, id, chars)
    highest_val: tuple[float, str, int] = (-math.inf, "", 0)
    remaining = cfg.max_documents
    for unit in list_work_units(cfg):
        if remaining == 0:
            break
        start, docs_in_chunk, chars_in_chunk, last_row = unit.start, 0, 0, -1
        for doc in read_documents(unit, cfg.text_column):
            score = split_score(doc.id, cfg.seed)
            split = "val" if score < cfg.val_fraction else "train"
            counts[split] += 1
            chars[split] += len(doc.text)
            if split == "train" and score < lowest_train[0]:
                lowest_train = (score, doc.id, len(doc.text))
            if split == "val" and score > highest_val[0]:
                highest_val = (score, doc.id, len(doc.text))
            docs_in_chunk += 1
            chars_in_chunk += len(doc.text)
            last_row = doc.row
            if remaining is not None:
                remaining -= 1
                if remaining == 0:
                    break
            if unit.format != "text" and chars_in_chunk >= UNIT_CHARS:
                units.append(replace(unit, start=start, stop=doc.row + 1))
                unit_chars.append(chars_in_chunk)
                start, docs_in_chunk, chars_in_chunk = doc.row + 1, 0, 0
        if docs_in_chunk:
            stop = last_row + 1 if remaining == 0 and unit.format != "text" else unit.stop
            units.append(replace(unit, start=start, stop=stop))
            unit_chars.append(chars_in_chunk)

    sources = list(cfg.sources) or [stdlib_root()]
    total = sum(counts.values())
    if total == 0:
        raise DataError(f"data.sources matched no documents (after dropping empty ones): {sources}")
    overrides: dict[str, str] = {}
    if cfg.val_fraction > 0 and total >= 2:
        if counts["val"] == 0:
            overrides[lowest_train[1]] = "val"
            moved, src, dst = lowest_train[2], "train", "val"
        elif counts["train"] == 0:
            overrides[highest_val[1]] = "train"
            moved, src, dst = highest_val[2], "val", "train"
        if overrides:
            counts[src] -= 1
            counts[dst] += 1
            chars[src] -= moved
            chars[dst] += moved
    return Plan(
        units=units,
        unit_chars=unit_chars,
        split_overrides=overrides,
        num_documents=counts,
        num_chars=chars,
        sources=sources,
    )


def group_units(unit_chars: list[int], num_groups: int) -> list[list[int]]:
    """Cut unit indices into at most num_groups contiguous, non-empty groups of about equal
    text size (deterministic: depends only on the sizes and num_groups)."""
    total = sum(unit_chars) or 1
    groups: dict[int, list[int]] = {}
    before = 0
    for i, size in enumerate(unit_chars):
        middle = before + size / 2
        groups.setdefault(min(num_groups - 1, int(middle / total * num_groups)), []).append(i)
        before += size
    return [groups[k] for k in sorted(groups)]
