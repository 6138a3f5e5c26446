"""manifest.json: what a prepared dataset holds. Its presence marks the dataset as complete.

The dataset directory (`out_dir`) is a storage URI: a local path, a shared mount, s3:// or
gs://. `read_manifest` is the one reader of it (None when there is none); `Manifest.load` is the
same but requires one. File names in the manifest are relative to out_dir (on object stores
they sit under a version prefix, see data_pipeline/prepare.py).

Version 2 is deterministic: the same settings and sources give the same bytes, whether the
prepare ran straight through or was killed and resumed (no wall-clock time in it; each shard's
sha256 pins its content). Version 1 manifests (with `created`, without shard digests) are
still read.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from data_pipeline import storage
from data_pipeline.config import DataError

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the dataset directory
    rows: int  # samples of seq_len + 1 tokens
    sha256: Optional[str] = None  # of the file's bytes (version 2; None in version 1)


class ShardTable(Sequence[ShardInfo]):
    """The shards of a split, column by column (read-only). A pretraining corpus has 1e5-1e6
    shards: one object per shard made loading the manifest of 244,141 take 0.7 s, a third of a
    loader's time to its first batch. Indexing gives a ShardInfo; `files` and `rows` are the
    columns."""

    def __init__(self, files: list[str], rows: np.ndarray, sha256: list[Optional[str]]):
        self.files, self.rows, self.sha256 = files, rows, sha256

    @classmethod
    def of(cls, shards: Iterable[Union[ShardInfo, dict[str, Any]]]) -> ShardTable:
        """From ShardInfo objects or a manifest's shard dicts (file, rows, optional sha256)."""
        if isinstance(shards, ShardTable):
            return shards
        rows = [s if isinstance(s, dict) else asdict(s) for s in shards]
        try:
            return cls(
                [r["file"] for r in rows],
                np.fromiter((r["rows"] for r in rows), dtype=np.int64, count=len(rows)),
                [r.get("sha256") for r in rows],
            )
        except (TypeError, ValueError) as exc:  # a count that is not an integer
            raise TypeError(f"a shard's rows is not an integer ({exc})") from None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return ShardInfo(self.files[i], int(self.rows[i]), self.sha256[i])

    def __iter__(self) -> Iterator[ShardInfo]:
        return map(ShardInfo, self.files, self.rows.tolist(), self.sha256)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"ShardTable({len(self)} shards)"

    def to_dicts(self) -> list[dict[str, Any]]:
        """As manifest.json writes them (no sha256 key in version 1)."""
        out = []
        for file, rows, sha in zip(self.files, self.rows.tolist(), self.sha256):
            out.append({"file": file, "rows": rows} if sha is None else
                       {"file": file, "rows": rows, "sha256": sha})  # fmt: skip
        return out


@dataclass
class SplitInfo:
    shards: ShardTable = field(default_factory=lambda: ShardTable.of([]))  # lists become one
    num_samples: int = 0
    num_tokens: int = 0  # tokens stored: num_samples * (seq_len + 1)
    dropped_tokens: int = 0  # each task's packing remainder, not stored
    # UTF-8 bytes of the split's documents, which every token (stored or dropped, one EOS per
    # document included) was made from; None in manifests written before it was recorded.
    num_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        self.shards = ShardTable.of(self.shards)

    @property
    def bytes_per_token(self) -> Optional[float]:
        """Raw text bytes per token of this split (None when the manifest did not record the
        bytes): what turns a loss per token into bits per byte."""
        tokens = self.num_tokens + self.dropped_tokens
        if self.num_bytes is None or tokens == 0:
            return None
        return self.num_bytes / tokens

    def to_dict(self) -> dict[str, Any]:
        d = {
            "shards": self.shards.to_dicts(),
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "dropped_tokens": self.dropped_tokens,
        }
        if self.num_bytes is not None:  # an older manifest reads back as it was
            d["num_bytes"] = self.num_bytes
        return d


@dataclass
class TokenizerInfo:
    file: str
    sha256: str
    vocab_size: int  # the tokenizer's real vocabulary size (may be below data.vocab_size)
    eos_id: int


@dataclass
class Manifest:
    version: int
    name: str
    tokenizer: TokenizerInfo
    seq_len: int
    splits: dict[str, SplitInfo]
    sources: list[str]
    num_documents: dict[str, int]
    settings: dict[str, Any]  # the settings fingerprint compared by prepare()
    fingerprint: str  # sha256 of the canonical settings JSON
    created: Optional[str] = None  # version 1 only (ISO 8601, UTC); never written by version 2
    stats: dict[str, Any] = field(default_factory=dict)  # num_tasks, chars, split

    def to_dict(self) -> dict[str, Any]:
        """As manifest.json holds it (a copy: changing it changes nothing here)."""
        d: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "splits":
                d["splits"] = {name: split.to_dict() for name, split in value.items()}
            elif f.name == "tokenizer":
                d["tokenizer"] = asdict(value)
            elif not (f.name == "created" and value is None):  # version 2 has no creation time
                d[f.name] = copy.deepcopy(value)
        return d

    @property
    def cache_key(self) -> str:
        """Changes whenever the dataset's files change (a digest of the manifest's content,
        which holds every shard's sha256; version 1: its creation time): what a reader keys
        cached shards on."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d["tokenizer"] = TokenizerInfo(**d["tokenizer"])
        d["splits"] = {name: SplitInfo(**split) for name, split in d["splits"].items()}
        return cls(**d)

    def files(self) -> list[str]:
        """Every file the dataset consists of (tokenizer and shards), relative to out_dir."""
        shards = [f for split in self.splits.values() for f in split.shards.files]
        return [self.tokenizer.file, *shards]

    def save(self, out_dir: str | Path) -> str:
        """Write out_dir/manifest.json through storage (locally via a temp file renamed into
        place; an object store replaces the whole object at once). Returns its URI."""
        uri = manifest_uri(out_dir)
        storage.write_text(uri, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return uri

    @classmethod
    def load(cls, out_dir: str | Path) -> Manifest:
        """Read out_dir/manifest.json; DataError if absent, malformed or of another version
        (StorageError if the storage cannot be read)."""
        manifest = read_manifest(out_dir)
        if manifest is None:
            raise DataError(
                f"no {MANIFEST_FILE} in {storage.absolute(str(out_dir))!r} (prepare it first: "
                "python -m data_pipeline.prepare)"
            )
        return manifest


def manifest_uri(out_dir: str | Path) -> str:
    return storage.join(storage.absolute(str(out_dir)), MANIFEST_FILE)


def read_manifest(out_dir: str | Path) -> Optional[Manifest]:
    """The manifest of the dataset in out_dir (any storage URI), or None if it has none.
    DataError if it is malformed or of another version; StorageError if the storage cannot be
    read (missing bucket, credentials, unreachable endpoint)."""
    uri = manifest_uri(out_dir)
    if not storage.is_file(uri):
        return None
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:  # removed since (an overwrite in progress elsewhere)
        return None
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{uri!r} is not valid JSON ({exc})") from None
    if not isinstance(d, dict) or d.get("version") not in READABLE_VERSIONS:
        version = d.get("version") if isinstance(d, dict) else None
        raise DataError(
            f"{uri!r} has version {version!r}, expected {MANIFEST_VERSION} (prepare the data again)"
        )
    try:
        return Manifest.from_dict(d)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{uri!r} is malformed ({type(exc).__name__}: {exc})") from None
