"""manifest.json: what a prepared dataset holds. Its presence marks the dataset as complete."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    stats: dict[str, Any] = field(default_factory=dict)  # seconds, num_tasks, ...

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

    def save(self, out_dir: str | Path) -> Path:
        """Write out_dir/manifest.json atomically (temp file + rename)."""
        path = Path(out_dir) / MANIFEST_FILE
        tmp = path.with_name(f".{MANIFEST_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, out_dir: str | Path) -> Manifest:
        """Read out_dir/manifest.json; DataError if absent, malformed or of another version."""
        path = Path(out_dir) / MANIFEST_FILE
        if not path.is_file():
            raise DataError(
                f"no {MANIFEST_FILE} in {str(out_dir)!r} (prepare it first: "
                "python -m data_pipeline.prepare)"
            )
        try:
            d = json.loads(path.read_text())
        except ValueError as exc:
            raise DataError(f"{str(path)!r} is not valid JSON ({exc})") from None
        if d.get("version") != MANIFEST_VERSION:
            raise DataError(
                f"{str(path)!r} has version {d.get('version')!r}, expected {MANIFEST_VERSION} "
                "(prepare the data again)"
            )
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError) as exc:
            raise DataError(f"{str(path)!r} is malformed ({type(exc).__name__}: {exc})") from None
