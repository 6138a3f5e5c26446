"""Data configuration (`cfg.data`) and the error type raised on bad input."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN]
FORMATS = ("auto", "text", "jsonl", "parquet")


class DataError(ValueError):
    """Bad data settings or input; the message is one line naming the value and the rule."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Settings of one prepared dataset; see data_pipeline/prepare.py for what each one does."""

    name: str = "stdlib"
    # Local paths, directories, globs or fsspec URLs; empty -> the built-in stdlib corpus.
    sources: list[str] = field(default_factory=list)
    format: str = "auto"  # auto | text | jsonl | parquet (auto: by file extension)
    text_column: str = "text"  # field of jsonl objects / column of parquet files
    # Optional[...] (not X | None) on purpose: OmegaConf structured configs need it.
    tokenizer: Optional[str] = None  # noqa: UP045  (a tokenizer.json; None -> train a BPE)
    vocab_size: int = 8192  # BPE vocab size when training one
    seq_len: int = 256  # each packed sample holds seq_len + 1 tokens
    val_fraction: float = 0.05  # fraction of documents held out, by a seeded hash of the doc id
    out_dir: str = "data/stdlib"  # shards, tokenizer.json and manifest.json go here
    samples_per_shard: int = 4096
    max_documents: Optional[int] = None  # noqa: UP045  (cap on documents, for tests)
    num_tasks: int = 0  # Ray tasks for tokenization; 0 -> from the corpus size
    seed: int = 1234

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            raise DataError(
                f"data.sources: must be a list of paths, got the string {self.sources!r} "
                f"(write data.sources=[{self.sources}])"
            )
        for source in self.sources:
            if not isinstance(source, str) or not source:
                raise DataError(f"data.sources: entry {source!r} is not a non-empty string")
        if self.format not in FORMATS:
            raise DataError(f"data.format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.text_column:
            raise DataError("data.text_column: must not be empty")
        if not self.out_dir:
            raise DataError("data.out_dir: must not be empty")
        _check_int("seq_len", self.seq_len, 1)
        _check_int("vocab_size", self.vocab_size, 256 + len(SPECIAL_TOKENS))
        _check_int("samples_per_shard", self.samples_per_shard, 1)
        _check_int("num_tasks", self.num_tasks, 0)
        _check_int("seed", self.seed, 0)
        if self.max_documents is not None:
            _check_int("max_documents", self.max_documents, 1)
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)):
            raise DataError(f"data.val_fraction: must be a number, got {self.val_fraction!r}")
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a plain dict (e.g. OmegaConf.to_container(cfg.data)); unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(
                f"data: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        values = dict(values)
        if values.get("sources") is None:
            values.pop("sources", None)
        elif not isinstance(values["sources"], str):
            values["sources"] = list(values["sources"])
        return cls(**values)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"data.{name}: must be an integer, got {value!r}")
    if value < minimum:
        raise DataError(f"data.{name}: must be >= {minimum}, got {value}")
