"""Validation bits per byte: the loss per byte of raw UTF-8 text, comparable across tokenizers.

A model's loss is in nats per token; a token stands for some bytes of text, a number that
depends on the tokenizer and the corpus. prepare records each split's bytes (SplitInfo.num_bytes
in manifest.json), so

    bits per byte = loss (nats/token) * tokens / bytes / ln 2 = loss / bytes_per_token / ln 2

with bytes_per_token the validation split's own ratio (data_pipeline/manifest.py). A manifest
written before the bytes were recorded gives no ratio: bits per byte is then left out, with a
note, never guessed.
"""

from __future__ import annotations

import math
from typing import Optional

LN2 = math.log(2.0)


def bits_per_byte(loss: float, bytes_per_token: Optional[float]) -> Optional[float]:
    """`loss` (mean nats per token) as bits per byte of raw text; None without a ratio."""
    if bytes_per_token is None or not bytes_per_token > 0:
        return None
    return loss / bytes_per_token / LN2


def val_bits_per_byte(
    losses: dict[str, float], bytes_per_token: dict[str, Optional[float]]
) -> tuple[Optional[float], dict[str, float]]:
    """(their mean, each source's bits per byte) for the val losses by source ({"": loss}
    for one dataset), as val_loss is the mean of the sources' losses. The mean is None when
    any source has no ratio; the per-source dict holds the sources that have one."""
    each = {name: bits_per_byte(loss, bytes_per_token.get(name)) for name, loss in losses.items()}
    known = {name: v for name, v in each.items() if v is not None}
    mean = sum(known.values()) / len(known) if known and len(known) == len(each) else None
    return mean, known


def missing_note(
    bytes_per_token: dict[str, Optional[float]], dirs: dict[str, str]
) -> Optional[str]:
    """One line naming the datasets whose manifest has no byte counts (None if all have)."""
    missing = [dirs[name] for name, v in bytes_per_token.items() if v is None]
    if not missing:
        return None
    return (
        "note: val bits per byte not reported: the manifest of "
        + ", ".join(repr(d) for d in missing)
        + " records no byte counts (prepared before they were; prepare again with --overwrite)"
    )
