"""Data configuration (`cfg.data`) and the error type raised on bad input."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN]
FORMATS = ("auto", "text", "jsonl", "parquet")
SPLIT_VALUES = ("train", "val")  # the values a data.split_column may hold
WINDOW_OFFSETS = ("packed", "random")
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)  # a byte-level BPE holds every byte + the specials


class DataError(ValueError):
    """Bad data settings or input; the message is one line naming the value and the rule."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Settings of one prepared dataset; see data_pipeline/prepare.py for what each one does."""

    name: str = "stdlib"
    # Local paths, directories, globs or fsspec URLs; empty -> the built-in stdlib corpus.
    sources: list[str] = field(default_factory=list)
    # Your validation set, in the same forms as sources: every document of these is "val" and,
    # with them (or split_column), nothing is held out by hash: the split is exactly as named.
    val_sources: list[str] = field(default_factory=list)
    # JSONL field / Parquet column of data.sources whose value ("train" or "val", exactly)
    # names each document's split; text files and rows of val_sources do not read it.
    split_column: Optional[str] = None  # noqa: UP045
    format: str = "auto"  # auto | text | jsonl | parquet (auto: by file extension)
    text_column: str = "text"  # field of jsonl objects / column of parquet files
    # Optional[...] (not X | None) on purpose: OmegaConf structured configs need it.
    tokenizer: Optional[str] = None  # noqa: UP045  (a tokenizer.json; None -> train a BPE)
    # BPE vocab size when training one; unused (and unchecked) when data.tokenizer is given.
    vocab_size: int = 8192
    seq_len: int = 256  # each packed sample holds seq_len + 1 tokens
    # Without val_sources / split_column: the fraction of documents held out for validation,
    # by a seeded hash of the document id (prepare warns when the held-out share of tokens is
    # far from it). Ignored when the split is given.
    val_fraction: float = 0.05
    out_dir: str = "data/stdlib"  # shards, tokenizer.json and manifest.json go here
    samples_per_shard: int = 4096
    # Cap on documents (of data.sources, and separately of data.val_sources), for tests.
    max_documents: Optional[int] = None  # noqa: UP045
    num_tasks: int = 0  # Ray tasks for tokenization; 0 -> from the corpus size
    seed: int = 1234
    # Training windows (the data order; not a prepare setting): "packed" trains on the packed
    # rows as stored; "random" shifts every window of an epoch by one keyed offset in
    # [0, seq_len] (see data_pipeline/loader.py), still exactly once per position.
    window_offset: str = "packed"

    def __post_init__(self) -> None:
        for key in ("sources", "val_sources"):
            paths = getattr(self, key)
            if isinstance(paths, str):
                raise DataError(
                    f"data.{key}: must be a list of paths, got the string {paths!r} "
                    f"(write data.{key}=[{paths}])"
                )
            for source in paths:
                if not isinstance(source, str) or not source:
                    raise DataError(f"data.{key}: entry {source!r} is not a non-empty string")
        both = sorted(set(self.sources) & set(self.val_sources))
        if both:
            raise DataError(
                f"data.val_sources: {both[0]!r} is also in data.sources; a validation source "
                "must not be trained on"
            )
        if self.split_column is not None and (
            not isinstance(self.split_column, str) or not self.split_column
        ):
            raise DataError(
                f"data.split_column: must be a column name or null, got {self.split_column!r}"
            )
        if self.split_column is not None and self.split_column == self.text_column:
            raise DataError(f"data.split_column: {self.split_column!r} is also data.text_column")
        if self.window_offset not in WINDOW_OFFSETS:
            raise DataError(
                f"data.window_offset: {self.window_offset!r} is not one of "
                f"{', '.join(WINDOW_OFFSETS)}"
            )
        if self.format not in FORMATS:
            raise DataError(f"data.format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.text_column:
            raise DataError("data.text_column: must not be empty")
        if not self.out_dir:
            raise DataError("data.out_dir: must not be empty")
        _check_int("seq_len", self.seq_len, 1)
        # The BPE's floor applies to the BPE prepare trains; a given tokenizer has its own size
        # (prepare's command line refuses an explicit data.vocab_size that contradicts it).
        _check_int("vocab_size", self.vocab_size, 1 if self.tokenizer else MIN_BPE_VOCAB)
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
        for key in ("sources", "val_sources"):
            if values.get(key) is None:
                values.pop(key, None)
            elif not isinstance(values[key], str):
                values[key] = list(values[key])
        return cls(**values)

    @property
    def split_given(self) -> bool:
        """The user named the validation set (val_sources or split_column): no hashed
        hold-out, val_fraction unused."""
        return bool(self.val_sources) or self.split_column is not None


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"data.{name}: must be an integer, got {value!r}")
    if value < minimum:
        raise DataError(f"data.{name}: must be >= {minimum}, got {value}")
