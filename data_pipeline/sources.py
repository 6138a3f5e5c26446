"""Where documents come from: the built-in stdlib corpus or user paths / globs / fsspec URLs.

Listing is cheap and gives *work units* (a file, its format and a row range) that a Ray task can
read on its own; `read_documents` turns one unit into documents. Every document has a stable id
(`<name>` for a text file, `<name>#<row>` for a JSONL line or Parquet row, where `<name>` is the
file's path relative to its source root).

The train/val split (`split_for`), in this order:
- a document of data.val_sources is "val";
- a JSONL/Parquet document of data.sources with data.split_column takes that field's value,
  which must be exactly "train" or "val";
- when the user named the split either way (DataConfig.split_given), every other document is
  "train": the validation set is exactly what the user gave, nothing is held out by hash;
- otherwise a seeded hash of the document id holds out about data.val_fraction of documents
  (so `x_train.txt` and `x_val.txt` land wherever the hash puts them: name them instead).
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

from data_pipeline.config import SPLIT_VALUES, DataConfig, DataError

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
    split: str | None = None  # from data.split_column, when read


@dataclass(frozen=True)
class WorkUnit:
    """A file (or a row range of one) that one task reads; plain fields so it pickles/JSONs."""

    path: str  # absolute local path or fsspec URL
    format: str  # text | jsonl | parquet
    name: str  # path relative to its source root; the base of document ids
    start: int = 0  # first row (JSONL line / Parquet row) to read
    stop: int | None = None  # one past the last row to read; None -> to the end
    # "val": a file of data.val_sources; "train": of data.sources when the split is given
    # (DataConfig.split_given); None: split by hash.
    split: str | None = None


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


def _expand_source(
    source: str, configured_format: str, key: str = "data.sources"
) -> list[WorkUnit]:
    is_url = "://" in source
    spec = source if is_url else os.path.expanduser(source)
    fs, root = fsspec.core.url_to_fs(spec)
    root = root.rstrip("/") or "/"
    if _GLOB_CHARS.search(root):
        base = _glob_base(root)
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
        if not paths:
            raise DataError(f"{key}: pattern {source!r} matched no files")
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
                f"{key}: directory {source!r} holds no files with a known extension "
                f"({', '.join(sorted(KNOWN_EXTENSIONS))})"
            )
    elif fs.isfile(root):
        base = posixpath.dirname(root)
        paths = [root]
    else:
        raise DataError(f"{key}: path {source!r} does not exist")
    local = isinstance(fs, LocalFileSystem)
    return [
        WorkUnit(
            path=fs.unstrip_protocol(p) if is_url or not local else p,
            format=format_of(p, configured_format),
            name=posixpath.relpath(p, base),
        )
        for p in paths
    ]


def _file_key(path: str) -> str:
    """One spelling per file, to tell whether two listings name the same file."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    return path if "://" in path else os.path.realpath(path)


def _expand_all(sources: list[str], configured_format: str, key: str) -> list[WorkUnit]:
    units: list[WorkUnit] = []
    seen: set[str] = set()
    for source in sources:
        for unit in _expand_source(source, configured_format, key):
            if unit.path not in seen:
                seen.add(unit.path)
                units.append(unit)
    return units


def list_work_units(cfg: DataConfig) -> list[WorkUnit]:
    """All files of cfg.sources (or the stdlib corpus when empty), then those of
    cfg.val_sources (split "val"), in a stable order: source by source, sorted within a
    source, a file matched twice kept once. DataError if a validation file is also a
    training file."""
    train_split = "train" if cfg.split_given else None
    if not cfg.sources:
        root = stdlib_root()
        units = [
            WorkUnit(
                path=p, format="text", name=Path(p).relative_to(root).as_posix(), split=train_split
            )
            for p in list_stdlib_files(root)
        ]
    else:
        units = [
            replace(u, split=train_split)
            for u in _expand_all(cfg.sources, cfg.format, "data.sources")
        ]
    if not cfg.val_sources:
        return units
    val_units = [
        replace(u, split="val")
        for u in _expand_all(cfg.val_sources, cfg.format, "data.val_sources")
    ]
    trained = {_file_key(u.path) for u in units}
    for unit in val_units:
        if _file_key(unit.path) in trained:
            raise DataError(
                f"data.val_sources: {unit.path!r} is also matched by data.sources; a validation "
                "file must not be trained on (narrow data.sources)"
            )
    return units + val_units


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


def _split_value(value: object, split_column: str, where: str) -> str:
    if isinstance(value, str) and value in SPLIT_VALUES:
        return value
    shown = "missing" if value is _MISSING else repr(value)
    raise DataError(
        f"{where}: data.split_column {split_column!r} is {shown}, must be 'train' or 'val'"
    )


_MISSING = object()


def _read_jsonl(
    unit: WorkUnit, text_column: str, split_column: str | None = None
) -> Iterator[Document]:
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
                split = None
                if split_column is not None:
                    split = _split_value(
                        obj.get(split_column, _MISSING),
                        split_column,
                        f"jsonl file {unit.path!r} line {row + 1}",
                    )
                yield Document(id=f"{unit.name}#{row}", text=text, row=row, split=split)


def _is_string(col_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(col_type):
        col_type = col_type.value_type
    return pa.types.is_string(col_type) or pa.types.is_large_string(col_type)


def _read_parquet(
    unit: WorkUnit, text_column: str, split_column: str | None = None
) -> Iterator[Document]:
    with fsspec.open(unit.path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if text_column not in names:
            raise DataError(
                f"parquet file {unit.path!r} has no column {text_column!r} "
                f"(columns: {', '.join(names)})"
            )
        columns = [text_column]
        if split_column is not None:
            if split_column not in names:
                raise DataError(
                    f"parquet file {unit.path!r} has no column {split_column!r} "
                    f"(data.split_column; columns: {', '.join(names)})"
                )
            columns.append(split_column)
        for name in columns:
            col_type = pf.schema_arrow.field(name).type
            if not _is_string(col_type):
                raise DataError(
                    f"parquet file {unit.path!r}: column {name!r} has type {col_type}, not string"
                )
        row = 0
        for batch in pf.iter_batches(columns=columns, batch_size=4096):
            n = batch.num_rows
            if row + n <= unit.start:
                row += n
                continue
            splits = batch.column(1).to_pylist() if split_column is not None else [None] * n
            for text, value in zip(batch.column(0).to_pylist(), splits):
                if unit.stop is not None and row >= unit.stop:
                    return
                if row >= unit.start and not _is_empty(text):
                    split = None
                    if split_column is not None:
                        split = _split_value(
                            value, split_column, f"parquet file {unit.path!r} row {row}"
                        )
                    yield Document(id=f"{unit.name}#{row}", text=text, row=row, split=split)
                row += 1


def read_documents(
    unit: WorkUnit, text_column: str = "text", split_column: str | None = None
) -> Iterator[Document]:
    """The non-empty documents of one work unit, in file order. With split_column, each JSONL /
    Parquet document of a training source carries its split (DataError on any value other than
    "train" / "val"); files of val_sources (unit.split "val") do not read it."""
    if unit.split == "val":
        split_column = None
    if unit.format == "text":
        yield from _read_text(unit)
    elif unit.format == "jsonl":
        yield from _read_jsonl(unit, text_column, split_column)
    elif unit.format == "parquet":
        yield from _read_parquet(unit, text_column, split_column)
    else:
        raise DataError(f"work unit {unit.path!r}: unknown format {unit.format!r}")


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """All non-empty documents of cfg, in listing order, at most cfg.max_documents."""
    count = 0
    for unit in list_work_units(cfg):
        for doc in read_documents(unit, cfg.text_column, cfg.split_column):
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


def split_for(
    doc: Document,
    unit: WorkUnit,
    val_fraction: float,
    seed: int,
    overrides: dict[str, str] | None = None,
) -> str:
    """The split of a document read from `unit` (see the module docstring for the order)."""
    given = doc.split or unit.split
    if given:
        return given
    return (overrides or {}).get(doc.id) or split_of(doc.id, val_fraction, seed)


def plan_documents(cfg: DataConfig) -> Plan:
    """Read every document once (no tokenizing): validate the input (split column values
    included), apply max_documents (to data.sources and, separately, to data.val_sources),
    count documents per split and cut big files into row ranges.

    Split fallback (hashed split only): with val_fraction > 0 and at least two documents, if
    the hash puts no document in val, the train document with the lowest hash score is held
    out (and likewise one goes back to train if all landed in val). Raises DataError when
    there is no document, or when a split the user gave (val_sources, split_column) leaves
    train or val without documents.
    """
    units: list[WorkUnit] = []
    unit_chars: list[int] = []
    counts = dict.fromkeys(SPLITS, 0)
    chars = dict.fromkeys(SPLITS, 0)
    lowest_train: tuple[float, str, int] = (math.inf, "", 0)  # (score, id, chars)
    highest_val: tuple[float, str, int] = (-math.inf, "", 0)
    remaining = {"train": cfg.max_documents, "val": cfg.max_documents}  # per kind of source
    for unit in list_work_units(cfg):
        kind = "val" if unit.split == "val" else "train"
        if remaining[kind] == 0:
            continue
        start, docs_in_chunk, chars_in_chunk, last_row = unit.start, 0, 0, -1
        for doc in read_documents(unit, cfg.text_column, cfg.split_column):
            given = doc.split or unit.split
            score = split_score(doc.id, cfg.seed)
            split = given or ("val" if score < cfg.val_fraction else "train")
            counts[split] += 1
            chars[split] += len(doc.text)
            if not given and split == "train" and score < lowest_train[0]:
                lowest_train = (score, doc.id, len(doc.text))
            if not given and split == "val" and score > highest_val[0]:
                highest_val = (score, doc.id, len(doc.text))
            docs_in_chunk += 1
            chars_in_chunk += len(doc.text)
            last_row = doc.row
            if remaining[kind] is not None:
                remaining[kind] -= 1
                if remaining[kind] == 0:
                    break
            if unit.format != "text" and chars_in_chunk >= UNIT_CHARS:
                units.append(replace(unit, start=start, stop=doc.row + 1))
                unit_chars.append(chars_in_chunk)
                start, docs_in_chunk, chars_in_chunk = doc.row + 1, 0, 0
        if docs_in_chunk:
            stop = last_row + 1 if remaining[kind] == 0 and unit.format != "text" else unit.stop
            units.append(replace(unit, start=start, stop=stop))
            unit_chars.append(chars_in_chunk)

    sources = list(cfg.sources) or [stdlib_root()]
    total = sum(counts.values())
    if total == 0:
        raise DataError(f"data.sources matched no documents (after dropping empty ones): {sources}")
    overrides: dict[str, str] = {}
    if cfg.split_given:
        for split in SPLITS:
            if counts[split] == 0:
                raise DataError(f"{split} split has 0 documents: {_given_split(cfg)}")
    elif cfg.val_fraction > 0 and total >= 2:
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


def _given_split(cfg: DataConfig) -> str:
    """How the user gave the split, for messages."""
    parts = []
    if cfg.val_sources:
        parts.append(f"data.val_sources={list(cfg.val_sources)} are val")
    if cfg.split_column is not None:
        parts.append(f"data.split_column={cfg.split_column!r} names each row's split")
    parts.append("every other document of data.sources is train")
    return "; ".join(parts)


def split_description(cfg: DataConfig) -> str:
    """How documents were split, for the manifest and messages."""
    if cfg.split_given:
        return _given_split(cfg)
    return f"hashed hold-out of document ids, data.val_fraction={cfg.val_fraction}"


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
