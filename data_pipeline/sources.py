"""Where documents come from: the built-in stdlib corpus or user paths / globs / fsspec URLs.

Listing (`plan_units`, on the driver) reads metadata only: file sizes, and the footers of
Parquet files (row groups, row counts, schema). It gives *work units* that a Ray task reads on
its own, with bounded memory (`read_documents` streams one unit):
- a text file (one document) is one unit;
- a JSONL file is cut into byte ranges: the unit [start, stop) owns the lines that START in
  [start, stop) (a task seeks to start, skips the rest of a line begun before it, and reads
  until a line starts at or after stop);
- a Parquet file is cut at row-group boundaries into row ranges [start, stop);
- a compressed file (.gz, .bz2, .xz, .zst) cannot be cut: it is one unit.
A unit that a task would have to hold whole (a text document, a compressed file, a Parquet row
group) and that is larger than data.task_memory_bytes is refused in one line.

Every document has a stable id that does not depend on how files are cut: `<name>` for a text
file, `<name>@<byte offset of its line>` for a JSONL line, `<name>#<row>` for a Parquet row,
where `<name>` is the file's path relative to its source root.

The train/val split (`split_for`), in this order:
- a document of data.val_sources is "val";
- a JSONL/Parquet document of data.sources with data.split_column takes that field's value,
  which must be exactly "train" or "val";
- when the user named the split either way (DataConfig.split_given), every other document is
  "train": the validation set is exactly what the user gave, nothing is held out by hash;
- otherwise a seeded hash of the document id holds out about data.val_fraction of documents
  (so `x_train.txt` and `x_val.txt` land wherever the hash puts them: name them instead).

data.max_documents (a cap for tests and smoke runs) is applied from metadata, in listing
order, separately to data.sources and data.val_sources: a text file counts as one document, a
Parquet row as one (rows with empty text included), and a JSONL file, whose line count the
listing does not know, takes what is left of the cap (its task stops after that many
documents) and ends the listing of its kind.
"""

from __future__ import annotations

import hashlib
import json
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
# Compressed files: read through fsspec's decompression, never cut (no random access).
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Document:
    id: str  # stable: used for the train/val split hash
    text: str
    row: int = 0  # byte offset of its line (JSONL) or row index (Parquet); 0 for text files
    split: str | None = None  # from data.split_column, when read


@dataclass(frozen=True)
class WorkUnit:
    """A file, or a range of one, that one task reads; plain fields so it pickles/JSONs."""

    path: str  # absolute local path or fsspec URL
    format: str  # text | jsonl | parquet
    name: str  # path relative to its source root; the base of document ids
    # JSONL: byte range [start, stop) (lines that start in it); Parquet: row range; text: unused.
    start: int = 0
    stop: int | None = None  # None -> to the end
    # "val": a file of data.val_sources; "train": of data.sources when the split is given
    # (DataConfig.split_given); None: split by hash.
    split: str | None = None
    size: int = 0  # bytes of the file (listing) or of the range (planned units): balancing
    limit: int | None = None  # at most this many documents (data.max_documents on a JSONL file)
    compression: str | None = None  # gzip | bz2 | xz | zstd (never cut)


@dataclass
class Listing:
    """The driver's plan: work units from metadata only (see `plan_units`)."""

    units: list[WorkUnit]
    sources: list[str] = field(default_factory=list)  # what was listed, for the manifest


# ---------------------------------------------------------------------------- the stdlib corpus


def stdlib_root() -> str:
    """The running interpreter's standard library directory."""
    return sysconfig.get_paths()["stdlib"]


def _is_test_dir(part: str) -> bool:
    return part.startswith("test") or part.endswith(("_test", "_tests"))


# A generated file says so in its first lines: the codec tables of encodings/ (gencodec.py's
# "Python Character Mapping Codec ... generated from"), pydoc's topics, token.py, keyword.py,
# stringprep.py, re/_casefix.py. They are mostly tables of numbers, a sixth of the corpus'
# bytes, and a model trained on them writes tables back.
GENERATED_HEADER = re.compile(
    r"Python Character Mapping Codec|generated from|autogenerated|auto-generated"
    r"|automatically generated|do not edit|^# .*generated by",
    re.IGNORECASE | re.MULTILINE,
)
HEADER_CHARS = 600


def list_stdlib_files(root: str | None = None) -> list[str]:
    """Sorted absolute paths of the stdlib's *.py files, without tests, site-packages,
    generated files (GENERATED_HEADER) and files that are not valid UTF-8."""
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
                text = Path(path).read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not GENERATED_HEADER.search(text[:HEADER_CHARS]):
                found.append(path)
    return sorted(found)


# ---------------------------------------------------------------------------- listing


def compression_of(path: str) -> str | None:
    """gzip / bz2 / xz / zstd by the file's last extension, else None."""
    return COMPRESSIONS.get(posixpath.splitext(path)[1].lower())


def _inner_ext(path: str) -> str:
    """The extension that names the format (before a compression extension)."""
    stem, ext = posixpath.splitext(path)
    if ext.lower() in COMPRESSIONS:
        ext = posixpath.splitext(stem)[1]
    return ext.lower()


def format_of(path: str, configured: str = "auto") -> str:
    """The format a file is read as: the configured one, or by extension (default text)."""
    if configured != "auto":
        return configured
    ext = _inner_ext(path)
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
        found = fs.glob(root, detail=True)
        paths = sorted(p for p, i in found.items() if i.get("type") == "file")
        sizes = {p: int(found[p].get("size") or 0) for p in paths}
        if not paths:
            raise DataError(f"{key}: pattern {source!r} matched no files")
    elif fs.isdir(root):
        base = root
        found = fs.find(root, detail=True)
        paths = sorted(
            p
            for p in found
            if _inner_ext(p) in KNOWN_EXTENSIONS
            and not any(part.startswith(".") for part in posixpath.relpath(p, root).split("/"))
        )
        sizes = {p: int(found[p].get("size") or 0) for p in paths}
        if not paths:
            raise DataError(
                f"{key}: directory {source!r} holds no files with a known extension "
                f"({', '.join(sorted(KNOWN_EXTENSIONS))})"
            )
    elif fs.isfile(root):
        base = posixpath.dirname(root)
        paths = [root]
        sizes = {root: int(fs.size(root) or 0)}
    else:
        raise DataError(f"{key}: path {source!r} does not exist")
    local = isinstance(fs, LocalFileSystem)
    return [
        WorkUnit(
            path=fs.unstrip_protocol(p) if is_url or not local else p,
            format=format_of(p, configured_format),
            name=posixpath.relpath(p, base),
            size=sizes[p],
            compression=compression_of(p),
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
    """All files of cfg.sources (or the stdlib corpus when empty), with their sizes, then those of
    cfg.val_sources (split "val"), in a stable order: source by source, sorted within a
    source, a file matched twice kept once. DataError if a validation file is also a
    training file."""
    train_split = "train" if cfg.split_given else None
    if not cfg.sources:
        root = stdlib_root()
        units = [
            WorkUnit(
                path=p,
                format="text",
                name=Path(p).relative_to(root).as_posix(),
                split=train_split,
                size=os.path.getsize(p),
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


# ---------------------------------------------------------------------------- planning


def _gib(n: int) -> str:
    """A byte count for messages."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _too_big(what: str, size: int, memory: int, why: str, remedy: str) -> DataError:
    return DataError(
        f"{what} is {_gib(size)}, more than data.task_memory_bytes={memory} ({_gib(memory)}): "
        f"{why}; {remedy} or raise data.task_memory_bytes"
    )


def plan_units(cfg: DataConfig, unit_bytes: int) -> Listing:
    """The work units of cfg from metadata only (sizes, Parquet footers; no document is read):
    JSONL files cut into byte ranges and Parquet files into row-group ranges of about
    unit_bytes, max_documents applied as the module docstring says. DataError when nothing is
    left, or when a unit that a task must hold whole is larger than cfg.task_memory_bytes."""
    remaining = {"train": cfg.max_documents, "val": cfg.max_documents}  # per kind of source
    units: list[WorkUnit] = []
    files = list_work_units(cfg)
    footers = _footers(files, cfg) if cfg.max_documents is None else {}
    for unit in files:
        kind = "val" if unit.split == "val" else "train"
        if remaining[kind] == 0 or unit.size == 0:
            continue
        pieces, taken = _cut(unit, cfg, unit_bytes, remaining[kind], footers.get(unit.path))
        units += pieces
        if remaining[kind] is not None:
            remaining[kind] = max(0, remaining[kind] - taken)
    sources = list(cfg.sources) or [stdlib_root()]
    if not units:
        raise DataError(f"data.sources matched no documents (after dropping empty ones): {sources}")
    return Listing(units=units, sources=sources)


FOOTER_THREADS = 16  # Parquet footers read at once (one request each on object stores)


def _footer(unit: WorkUnit, cfg: DataConfig) -> pq.FileMetaData:
    """A Parquet file's footer, its columns checked (DataError naming the file otherwise)."""
    with fsspec.open(unit.path, "rb") as f:
        pf = open_parquet(unit.path, f)
        parquet_columns(pf, unit, cfg.text_column, cfg.split_column)
        return pf.metadata


def _footers(files: list[WorkUnit], cfg: DataConfig) -> dict[str, pq.FileMetaData]:
    """The footers of every non-empty uncompressed Parquet file, read by a few threads; the
    first failure in listing order is raised."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = [u for u in files if u.format == "parquet" and u.size and not u.compression]
    if len(wanted) < 2:
        return {}
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(wanted))) as pool:
        futures = [pool.submit(_footer, u, cfg) for u in wanted]
        return {u.path: f.result() for u, f in zip(wanted, futures)}


def _cut(
    unit: WorkUnit,
    cfg: DataConfig,
    unit_bytes: int,
    cap: int | None,
    footer: pq.FileMetaData | None = None,
):
    """(units of one file, documents they count against max_documents)."""
    memory = cfg.task_memory_bytes
    if unit.compression:
        if unit.format == "parquet":
            raise DataError(
                f"parquet file {unit.path!r} is {unit.compression}-compressed as a whole: "
                "Parquet compresses its pages itself; give the .parquet file"
            )
        if unit.size > memory:
            raise _too_big(
                f"{unit.compression} file {unit.path!r}", unit.size, memory,
                "a compressed file cannot be cut into ranges, one task would read it whole",
                "decompress it or split it into smaller files",
            )  # fmt: skip
        if unit.format == "jsonl":
            return [replace(unit, limit=cap)], (cap or 0)
        return [unit], 1
    if unit.format == "text":
        if unit.size > memory:
            raise _too_big(
                f"text file {unit.path!r}", unit.size, memory,
                "a text file is one document, which one task holds whole",
                "split it into smaller files",
            )  # fmt: skip
        return [unit], 1
    if unit.format == "jsonl":
        if cap is not None:  # its line count is unknown: it takes the rest of the cap
            return [replace(unit, limit=cap)], cap
        return byte_ranges(unit, unit_bytes), 0
    if unit.format == "parquet":
        return _parquet_units(unit, cfg, unit_bytes, cap, footer or _footer(unit, cfg))
    raise DataError(f"work unit {unit.path!r}: unknown format {unit.format!r}")


def byte_ranges(unit: WorkUnit, unit_bytes: int) -> list[WorkUnit]:
    """A JSONL file cut into byte ranges of unit_bytes (the last one to the end)."""
    cuts = list(range(0, unit.size, max(1, unit_bytes)))
    return [
        replace(
            unit,
            start=a,
            stop=cuts[k + 1] if k + 1 < len(cuts) else None,
            size=(cuts[k + 1] if k + 1 < len(cuts) else unit.size) - a,
        )
        for k, a in enumerate(cuts)
    ]


def _parquet_units(
    unit: WorkUnit, cfg: DataConfig, unit_bytes: int, cap: int | None, meta: pq.FileMetaData
):
    """Row-group ranges of one Parquet file from its footer; rows count against the cap."""
    units: list[WorkUnit] = []
    start, row, size = 0, 0, 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        if group.total_byte_size > cfg.task_memory_bytes:
            raise _too_big(
                f"parquet file {unit.path!r} row group {i}", group.total_byte_size,
                cfg.task_memory_bytes, "a task decodes a row group whole",
                "rewrite the file with smaller row groups (pyarrow: row_group_size=...)",
            )  # fmt: skip
        rows = group.num_rows
        if cap is not None and row + rows >= cap:
            rows = cap - row
        row += rows
        size += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        if size >= unit_bytes or (cap is not None and row >= cap):
            units.append(replace(unit, start=start, stop=row, size=size))
            start, size = row, 0
        if cap is not None and row >= cap:
            break
    if row > start:
        units.append(replace(unit, start=start, stop=row, size=size))
    return units, row


def group_units(sizes: list[int], num_groups: int) -> list[list[int]]:
    """Cut unit indices into at most num_groups contiguous, non-empty groups of about equal
    size (deterministic: depends only on the sizes and num_groups)."""
    total = sum(sizes) or 1
    groups: dict[int, list[int]] = {}
    before = 0
    for i, size in enumerate(sizes):
        middle = before + size / 2
        groups.setdefault(min(num_groups - 1, int(middle / total * num_groups)), []).append(i)
        before += size
    return [groups[k] for k in sorted(groups)]


# ---------------------------------------------------------------------------- reading


def _is_empty(text: str | None) -> bool:
    return text is None or not text.strip()


def _open(unit: WorkUnit):
    """The unit's file, binary, decompressed when it is compressed."""
    try:
        return fsspec.open(unit.path, "rb", compression=unit.compression)
    except ValueError as exc:  # a codec fsspec has no module for (zstd needs `zstandard`)
        raise DataError(f"{unit.compression} file {unit.path!r} cannot be read: {exc}") from None


def _read_text(unit: WorkUnit) -> Iterator[Document]:
    with _open(unit) as f:
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


def jsonl_lines(f, start: int, stop: int | None, max_line: int | None = None):
    """(byte offset, line) of the lines of an open binary file that start in [start, stop):
    a line begun before `start` belongs to the range before. CRLF and a last line without a
    newline are lines like any other. max_line: the most one line may hold; a longer line is
    yielded as None at its offset (the caller names it) and ends the reading."""
    if start > 0:
        f.seek(start - 1)
        if f.read(1) != b"\n":
            f.readline()  # the rest of a line that starts before this range
    pos = f.tell()
    while stop is None or pos < stop:
        line = f.readline() if max_line is None else f.readline(max_line + 1)
        if not line:
            return
        if max_line is not None and len(line) > max_line and not line.endswith(b"\n"):
            yield pos, None
            return
        yield pos, line
        pos += len(line)


def _read_jsonl(
    unit: WorkUnit, text_column: str, split_column: str | None = None, max_line: int | None = None
) -> Iterator[Document]:
    count = 0
    with _open(unit) as f:
        for number, (pos, line) in enumerate(jsonl_lines(f, unit.start, unit.stop, max_line)):
            where = f"jsonl file {unit.path!r} " + (
                f"line {number + 1}" if unit.start == 0 else f"line at byte {pos}"
            )
            if line is None:
                raise DataError(
                    f"{where} is longer than data.task_memory_bytes={max_line}: a task holds a "
                    "line whole; split the document or raise data.task_memory_bytes"
                )
            if unit.limit is not None and count >= unit.limit:
                return
            doc = _jsonl_document(line, where, unit, pos, text_column, split_column)
            if doc is not None:
                count += 1
                yield doc


def _jsonl_document(
    line: bytes, where: str, unit: WorkUnit, pos: int, text_column: str, split_column: str | None
) -> Document | None:
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except ValueError as exc:
        msg = getattr(exc, "msg", str(exc))
        raise DataError(f"{where}: invalid JSON ({msg})") from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: is a JSON {_json_kind(obj)}, not an object (each line must be one "
            f"object with a {text_column!r} field)"
        )
    if text_column not in obj:
        raise DataError(f"{where} has no field {text_column!r} (fields: {', '.join(obj)})")
    text = obj[text_column]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field {text_column!r} is {type(text).__name__}, not a string")
    if _is_empty(text):
        return None
    split = None
    if split_column is not None:
        split = _split_value(obj.get(split_column, _MISSING), split_column, where)
    return Document(id=f"{unit.name}@{pos}", text=text, row=pos, split=split)


def _json_kind(value: object) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def _parquet_error(path: str, exc: BaseException, where: str = "") -> DataError:
    """A file that pyarrow cannot read as Parquet (not Parquet at all, truncated, damaged
    pages) as one line naming the file (and row group) and what is wrong."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return DataError(f"parquet file {path!r}{where} cannot be read as Parquet: {reason}")


def open_parquet(path: str, f) -> pq.ParquetFile:
    """pq.ParquetFile of an open file; DataError (one line naming the file) when it is not a
    readable Parquet file: no magic bytes (another kind of file), a truncated footer."""
    try:
        return pq.ParquetFile(f)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _parquet_error(path, exc) from None


def check_parquet_files(units: list[WorkUnit], cfg: DataConfig) -> None:
    """Reads the footer of every local Parquet work unit (a few KB each): a damaged or
    non-Parquet file, or one without the text (or split) column, is refused before anything
    starts. Object-store files are read by prepare (a request per file would cost minutes on
    large datasets)."""
    for unit in units:
        if unit.format == "parquet" and "://" not in unit.path:
            with open(unit.path, "rb") as f:
                parquet_columns(open_parquet(unit.path, f), unit, cfg.text_column, cfg.split_column)


def _is_string(col_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(col_type):
        col_type = col_type.value_type
    return pa.types.is_string(col_type) or pa.types.is_large_string(col_type)


def parquet_columns(
    pf: pq.ParquetFile, unit: WorkUnit, text_column: str, split_column: str | None
) -> list[str]:
    """The columns prepare reads, checked against the file's schema (DataError otherwise)."""
    names = pf.schema_arrow.names
    if text_column not in names:
        raise DataError(
            f"parquet file {unit.path!r} has no column {text_column!r} "
            f"(columns: {', '.join(names)})"
        )
    columns = [text_column]
    if split_column is not None and unit.split != "val":
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
    return columns


PARQUET_BATCH = 1024  # rows per record batch read from a row group


def _read_parquet(
    unit: WorkUnit, text_column: str, split_column: str | None = None
) -> Iterator[Document]:
    """The rows [start, stop) of one Parquet file, row group by row group, in record batches."""
    with fsspec.open(unit.path, "rb") as f:
        pf = open_parquet(unit.path, f)
        columns = parquet_columns(pf, unit, text_column, split_column)
        meta = pf.metadata
        first = 0
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            lo, hi = max(first, unit.start), first + rows
            if unit.stop is not None:
                hi = min(hi, unit.stop)
            if lo < hi:
                where = f" row group {i} (rows {first}-{first + rows - 1})"
                try:
                    yield from _row_group(pf, i, first, lo, hi, unit, columns, split_column)
                except (pa.ArrowException, OSError) as exc:  # damaged pages, valid footer
                    raise _parquet_error(unit.path, exc, where) from None
            first += rows
            if unit.stop is not None and first >= unit.stop:
                return


def _row_group(
    pf: pq.ParquetFile,
    index: int,
    first: int,
    lo: int,
    hi: int,
    unit: WorkUnit,
    columns: list[str],
    split_column: str | None,
) -> Iterator[Document]:
    row = first
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=[index], columns=columns):
        n = batch.num_rows
        if row + n <= lo:
            row += n
            continue
        given = len(columns) > 1
        splits = batch.column(1).to_pylist() if given else [None] * n
        for text, value in zip(batch.column(0).to_pylist(), splits):
            if row >= hi:
                return
            if row >= lo and not _is_empty(text):
                split = None
                if given:
                    split = _split_value(
                        value, split_column, f"parquet file {unit.path!r} row {row}"
                    )
                yield Document(id=f"{unit.name}#{row}", text=text, row=row, split=split)
            row += 1


def read_documents(
    unit: WorkUnit,
    text_column: str = "text",
    split_column: str | None = None,
    max_line: int | None = None,
) -> Iterator[Document]:
    """The non-empty documents of one work unit, in file order, streamed (a Parquet record
    batch, a JSONL line at a time; a text file whole). With split_column, each JSONL /
    Parquet document of a training source carries its split (DataError on any value other
    than "train" / "val"); files of val_sources (unit.split "val") do not read it.
    max_line: the longest JSONL line a task may hold (data.task_memory_bytes)."""
    if unit.split == "val":
        split_column = None
    if unit.format == "text":
        yield from _read_text(unit)
    elif unit.format == "jsonl":
        yield from _read_jsonl(unit, text_column, split_column, max_line)
    elif unit.format == "parquet":
        yield from _read_parquet(unit, text_column, split_column)
    else:
        raise DataError(f"work unit {unit.path!r}: unknown format {unit.format!r}")


def iter_documents(cfg: DataConfig, unit_bytes: int = 64 << 20) -> Iterator[Document]:
    """All non-empty documents of cfg's planned units (max_documents applied as planned), in
    listing order. Reads everything: for benchmarks and tests, never prepare's driver."""
    for unit in plan_units(cfg, unit_bytes).units:
        yield from read_documents(unit, cfg.text_column, cfg.split_column)


# ---------------------------------------------------------------------------- train/val split


def split_score(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) from a seeded hash of the document id."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(doc_id: str, val_fraction: float, seed: int) -> str:
    """'val' for about val_fraction of the document ids, else 'train'."""
    return "val" if split_score(doc_id, seed) < val_fraction else "train"


def split_for(doc: Document, unit: WorkUnit, val_fraction: float, seed: int) -> str:
    """The split of a document read from `unit` (see the module docstring for the order)."""
    given = doc.split or unit.split
    if given:
        return given
    return split_of(doc.id, val_fraction, seed)


def given_split(cfg: DataConfig) -> str:
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
        return given_split(cfg)
    return f"hashed hold-out of document ids, data.val_fraction={cfg.val_fraction}"
