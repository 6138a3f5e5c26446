"""Byte-level BPE tokenizer (HF `tokenizers`): train one, or load an existing tokenizer.json."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import fsspec
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline import storage
from data_pipeline.config import EOS_TOKEN, MIN_BPE_VOCAB, SPECIAL_TOKENS, DataError

__all__ = [
    "EOS_TOKEN",
    "Tokenizer",
    "eos_id",
    "file_sha256",
    "load_tokenizer",
    "read_file",
    "train_tokenizer",
]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (ByteLevel pre-tokenizer and decoder, `<|endoftext|>` special)
    on `texts`. The vocabulary can come out smaller than vocab_size on little text."""
    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(
            f"data.vocab_size: must be >= {MIN_BPE_VOCAB} to train a byte-level BPE, got "
            f"{vocab_size} (or give a tokenizer.json as data.tokenizer)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def read_file(path: str) -> bytes:
    """The bytes of a tokenizer.json: a storage URI (local path, s3://, gs://) or another fsspec
    URL. DataError if it does not exist; StorageError if the storage cannot be read."""
    try:
        if storage.scheme(path) in ("", "file", *storage.REMOTE_SCHEMES):
            return storage.read_bytes(path)
        with fsspec.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"data.tokenizer: path {path!r} does not exist") from None


EXPECTED = (
    "data.tokenizer expects a tokenizer.json: the one file Hugging Face `tokenizers` saves "
    "(with 'model' and 'added_tokens'), found beside a Hub model's tokenizer_config.json"
)


def wrong_kind(path: str, data: bytes) -> str | None:
    """What a file given as data.tokenizer is when it is another kind of tokenizer file (a
    tokenizer_config.json, special_tokens_map.json, vocab.json, vocab.txt, merges.txt), or
    None when it looks like a tokenizer.json (or like nothing known)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    try:
        obj = json.loads(data.decode("utf-8"))
    except ValueError:
        obj = None
    if isinstance(obj, dict) and "model" in obj and "added_tokens" in obj:
        return None
    if name == "tokenizer_config.json" or (isinstance(obj, dict) and "tokenizer_class" in obj):
        kind = "a tokenizer_config.json (tokenizer settings, no vocabulary)"
    elif name == "special_tokens_map.json":
        kind = "a special_tokens_map.json"
    elif isinstance(obj, dict) and obj and all(isinstance(v, int) for v in obj.values()):
        kind = "a vocab file (token -> id only, no merges or pre-tokenizer)"
    elif name in ("vocab.txt", "merges.txt") or data.startswith(b"#version"):
        kind = f"a {name if name in ('vocab.txt', 'merges.txt') else 'merges'} file"
    else:
        return None
    return f"data.tokenizer: {path!r} is {kind}, not a tokenizer.json; {EXPECTED}"


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer.json (local path, s3:// / gs:// URI or fsspec URL); it must define
    `<|endoftext|>`."""
    if not storage.is_remote(path) and Path(path).is_dir():
        raise DataError(f"data.tokenizer: {path!r} is a directory; {EXPECTED}")
    data = read_file(path)
    kind = wrong_kind(path, data)
    if kind:
        raise DataError(kind)
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"data.tokenizer: {path!r} is not a valid tokenizer.json ({reason})"
        ) from None
    eos_id(tok, where=path)
    return tok


def eos_id(tok: Tokenizer, *, where: str = "tokenizer") -> int:
    """Id of `<|endoftext|>`; DataError if the tokenizer has none."""
    token_id = tok.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise DataError(f"data.tokenizer: {where!r} has no {EOS_TOKEN!r} token (needed as EOS)")
    return token_id


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes (local path, s3:// / gs:// URI or fsspec URL)."""
    return hashlib.sha256(read_file(str(path))).hexdigest()
