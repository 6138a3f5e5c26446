"""Data configuration (`cfg.data`) and the error type raised on bad input."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any, Optional

from data_pipeline.order import DEFAULT_CHUNK, DEFAULT_WINDOW

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
    # prepare at scale (data_pipeline/prepare.py): the BPE trains on a seeded sample of at most
    # this many bytes of train text (the whole train split, in order, when the sources fit);
    # each task holds at most about this much (a text document, a compressed file, a Parquet
    # row group or a JSONL line larger than it is refused) and the listing cuts units by it.
    tokenizer_sample_bytes: int = 1 << 30
    task_memory_bytes: int = 2 << 30
    seed: int = 1234
    # Training windows (the data order; not a prepare setting): "packed" trains on the packed
    # rows as stored; "random" shifts every window of an epoch by one keyed offset in
    # [0, seq_len] (see data_pipeline/loader.py), still exactly once per position.
    window_offset: str = "packed"
    # The order and the reads (training only; data_pipeline/order.py, loader.py): new runs put
    # chunks of order_chunk consecutive samples (best: the shards' row-group size) in a keyed
    # order and shuffle samples within windows of order_window chunks; a checkpoint keeps the
    # order it was written with. Decoded row groups are kept in memory up to read_cache_mb per
    # split and rank, read by read_threads threads, prefetch_steps steps ahead.
    order_chunk: int = DEFAULT_CHUNK
    order_window: int = DEFAULT_WINDOW
    read_cache_mb: int = 1024
    read_threads: int = 8
    prefetch_steps: int = 16
    # Weighted mixture of already prepared datasets (data_pipeline/mixture.py); no sources =
    # no mixture. With one, training reads the mixture's datasets and nothing of the
    # prepare settings above (sources, out_dir, tokenizer, ...) is used.
    mixture: MixtureConfig = field(default_factory=lambda: MixtureConfig())

    def __post_init__(self) -> None:
        self._check_mixture()
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
        _check_int("tokenizer_sample_bytes", self.tokenizer_sample_bytes, 1)
        _check_int("task_memory_bytes", self.task_memory_bytes, 1 << 16)
        _check_int("seed", self.seed, 0)
        for name in ("order_chunk", "order_window", "read_cache_mb", "read_threads"):
            _check_int(name, getattr(self, name), 1)
        _check_int("prefetch_steps", self.prefetch_steps, 0)
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

    def _check_mixture(self) -> None:
        """data.mixture as a MixtureConfig (Hydra and from_dict hand it over as a dict)."""
        if isinstance(self.mixture, dict):
            object.__setattr__(self, "mixture", MixtureConfig.from_dict(self.mixture))
        elif not isinstance(self.mixture, MixtureConfig):
            raise DataError(f"data.mixture: must be a mapping, got {self.mixture!r}")
        if self.mixture and self.window_offset != "packed":
            raise DataError(
                f"data.window_offset={self.window_offset!r} with data.mixture: a mixture "
                "trains on packed rows only"
            )

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


# ---------------------------------------------------------------------------- data.mixture
# The settings of a weighted mixture of prepared datasets; the mixing itself is in
# data_pipeline/mixture.py. Source names are sorted for every rule that needs an order (the
# block shares' ties, the slots of a block), so the order they are written in never matters.

MIXTURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
DEFAULT_BLOCK = 1000


@dataclass(frozen=True, kw_only=True)
class MixtureSource:
    """One prepared dataset of a mixture: a storage URI holding manifest.json."""

    dir: str
    weight: float = 1.0


@dataclass(frozen=True, kw_only=True)
class MixtureStage:
    """After `step` optimizer steps (from global sample step x trainer.global_batch_size on),
    the mixture's weights are `weights` (every source named)."""

    step: int
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class MixtureConfig:
    """data.mixture: sources (name -> dir, weight), optional stages, and the block size B:
    every B consecutive samples hold each source's share of B exactly (block_shares)."""

    # dict[str, MixtureSource] and list[MixtureStage] once built; typed Any for Hydra, which
    # cannot merge new entries into nodes of a frozen dataclass type.
    sources: dict[str, Any] = field(default_factory=dict)
    stages: list[Any] = field(default_factory=list)
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", _mixture_sources(self.sources))
        object.__setattr__(self, "stages", _mixture_stages(self.stages))
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise DataError(f"data.mixture.block: must be an integer >= 1, got {self.block!r}")
        if self.stages and not self.sources:
            raise DataError("data.mixture.stages: given without data.mixture.sources")
        if self.sources:
            base = {name: s.weight for name, s in self.sources.items()}
            self._check_weights("data.mixture.sources (weights)", base)
        last = 0
        for i, stage in enumerate(self.stages):
            where = f"data.mixture.stages[{i}]"
            if stage.step <= last:
                raise DataError(
                    f"{where}.step: {stage.step} is not after {last} (the previous stage's step, "
                    "0 for the sources' weights): stage steps must increase"
                )
            last = stage.step
            self._check_weights(f"{where}.weights", stage.weights)

    def __bool__(self) -> bool:
        return bool(self.sources)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MixtureConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(
                f"data.mixture: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**values)

    @property
    def names(self) -> list[str]:
        """The source names, sorted: source index i is names[i]."""
        return sorted(self.sources)

    def _check_weights(self, where: str, weights: dict[str, float]) -> None:
        unknown = sorted(set(weights) - set(self.sources))
        if unknown:
            raise DataError(
                f"{where}: unknown source {unknown[0]!r} (sources: {', '.join(self.names)})"
            )
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise DataError(
                f"{where}: no weight for source {missing[0]!r} (every stage names every "
                "source; write 0 to leave one out)"
            )
        for name in self.names:
            w = weights[name]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise DataError(f"{where}: weight of {name!r} must be a number, got {w!r}")
            if w < 0:
                raise DataError(f"{where}: weight of {name!r} is {w}; weights must be >= 0")
        if sum(weights.values()) <= 0:
            raise DataError(
                f"{where}: weights sum to {sum(weights.values())}; they must sum to > 0"
            )
        shares = block_shares(weights, self.block)
        starved = [n for n in self.names if weights[n] > 0 and shares[n] == 0]
        if starved:
            raise DataError(
                f"{where}: source {starved[0]!r} (weight {weights[starved[0]]}) gets 0 of the "
                f"{self.block} samples of a block: raise data.mixture.block"
            )


def block_shares(weights: dict[str, float], block: int) -> dict[str, int]:
    """Each source's samples in a block of `block`: largest remainder of weight / sum x block.

    Every source first gets floor(quota); the samples left over go one each to the largest
    fractional parts, ties to the source whose name sorts first. Exact (rational) arithmetic,
    so the same weights give the same shares on every machine. Shares sum to `block`."""
    names = sorted(weights)
    fracs = {n: Fraction(weights[n]) for n in names}
    total = sum(fracs.values())
    quotas = {n: fracs[n] * block / total for n in names}
    shares = {n: math.floor(q) for n, q in quotas.items()}
    left = block - sum(shares.values())
    by_remainder = sorted(names, key=lambda n: (-(quotas[n] - shares[n]), names.index(n)))
    for n in by_remainder[:left]:
        shares[n] += 1
    return shares


def _mixture_sources(values: Any) -> dict[str, MixtureSource]:
    if not isinstance(values, dict):
        raise DataError(
            f"data.mixture.sources: must be a mapping name -> {{dir, weight}}, got {values!r}"
        )
    out = {}
    for name, source in values.items():
        where = f"data.mixture.sources.{name}"
        if not isinstance(name, str) or not MIXTURE_NAME.fullmatch(name):
            raise DataError(
                f"data.mixture.sources: name {name!r} must be letters, digits, '_', '.', '-'"
            )
        if isinstance(source, dict):
            unknown = sorted(set(source) - {"dir", "weight"})
            if unknown:
                raise DataError(
                    f"{where}: unknown key(s) {', '.join(unknown)} (known: dir, weight)"
                )
            if "dir" not in source:
                raise DataError(f"{where}.dir: missing (a prepared dataset's directory or URI)")
            source = MixtureSource(**source)
        if not isinstance(source, MixtureSource):
            raise DataError(f"{where}: must be a mapping {{dir, weight}}, got {source!r}")
        if not isinstance(source.dir, str) or not source.dir:
            raise DataError(f"{where}.dir: must be a non-empty path or URI, got {source.dir!r}")
        out[name] = source
    return out


def _mixture_stages(values: Any) -> list[MixtureStage]:
    if not isinstance(values, (list, tuple)):
        raise DataError(f"data.mixture.stages: must be a list of {{step, weights}}, got {values!r}")
    out = []
    for i, stage in enumerate(values):
        where = f"data.mixture.stages[{i}]"
        if isinstance(stage, dict):
            unknown = sorted(set(stage) - {"step", "weights"})
            if unknown:
                raise DataError(
                    f"{where}: unknown key(s) {', '.join(unknown)} (known: step, weights)"
                )
            if "step" not in stage:
                raise DataError(f"{where}.step: missing (the first optimizer step of the stage)")
            stage = MixtureStage(step=stage["step"], weights=dict(stage.get("weights") or {}))
        if not isinstance(stage, MixtureStage):
            raise DataError(f"{where}: must be a mapping {{step, weights}}, got {stage!r}")
        if isinstance(stage.step, bool) or not isinstance(stage.step, int):
            raise DataError(f"{where}.step: must be an integer, got {stage.step!r}")
        if not isinstance(stage.weights, dict):
            raise DataError(f"{where}.weights: must be a mapping name -> weight")
        out.append(stage)
    return out
