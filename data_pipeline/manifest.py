"""manifest.json: what a prepared dataset holds. Its presence marks the dataset as complete.

The dataset directory (`out_dir`) is a storage URI: a local path, a shared mount, s3:// or
gs://. `read_manifest` is the one reader of it (None when there is none); `Manifest.load` is the
same but requires one. File names in the manifest are relative to out_dir (on object stores
they sit under a version prefix, see data_pipeline/prepare.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from data_pipeline import storage
from data_pipeline.config import DataError

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1


@dataclass
class ShardInfo:
    file: str  # relative to the dataset directory
    rows: int  # samples of seq_len + 1 tokens


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)
    num_samples: int = 0
    num_tokens: int = 0  # tokens stored: num_samples * (seq_len + 1)
    dropped_tokens: int = 0  # each task's packing remainder, not stored


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
    created: str  # ISO 8601, UTC
    stats: dict[str, Any] = field(default_factory=dict)  # seconds, num_tasks, split, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d["tokenizer"] = TokenizerInfo(**d["tokenizer"])
        d["splits"] = {
            name: SplitInfo(
                **{**split, "shards": [ShardInfo(**shard) for shard in split["shards"]]}
            )
            for name, split in d["splits"].items()
        }
        return cls(**d)

    def files(self) -> list[str]:
        """Every file the dataset consists of (tokenizer and shards), relative to out_dir."""
        shards = [s.file for split in self.splits.values() for s in split.shards]
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
    if not isinstance(d, dict) or d.get("version") != MANIFEST_VERSION:
        version = d.get("version") if isinstance(d, dict) else None
        raise DataError(
            f"{uri!r} has version {version!r}, expected {MANIFEST_VERSION} (prepare the data again)"
        )
    try:
        return Manifest.from_dict(d)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{uri!r} is malformed ({type(exc).__name__}: {exc})") from None
