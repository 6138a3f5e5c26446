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

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from data_pipeline import storage
from data_pipeline.config import DataError

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class ShardInfo:
    file: str  # relative to the dataset directory
    rows: int  # samples of seq_len + 1 tokens
    sha256: Optional[str] = None  # of the file's bytes (version 2; None in version 1)


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
    created: Optional[str] = None  # version 1 only (ISO 8601, UTC); never written by version 2
    stats: dict[str, Any] = field(default_factory=dict)  # num_tasks, chars, split

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["created"] is None:
            del d["created"]
        for split in d["splits"].values():
            for shard in split["shards"]:
                if shard["sha256"] is None:
                    del shard["sha256"]
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
    if not isinstance(d, dict) or d.get("version") not in READABLE_VERSIONS:
        version = d.get("version") if isinstance(d, dict) else None
        raise DataError(
            f"{uri!r} has version {version!r}, expected {MANIFEST_VERSION} (prepare the data again)"
        )
    try:
        return Manifest.from_dict(d)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{uri!r} is malformed ({type(exc).__name__}: {exc})") from None
