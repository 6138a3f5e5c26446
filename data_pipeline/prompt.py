"""The default prompt of the end-of-training sample: the start of the data's first validation
document, so that a model trained on your data is asked to continue your data (not Python).

    default_prompt(data_dir, n_tokens=16) -> str

Takes the first row of the val split (train when val is empty): row 0 of the first shard starts
with the first document of its prepare task, so it is a document's beginning. Keeps at most
n_tokens tokens, stops before the first EOS, and drops a trailing partial character (a byte-level
BPE can cut a UTF-8 character between tokens).
"""

from __future__ import annotations

from data_pipeline import storage
from data_pipeline.loader import TokenShards
from data_pipeline.tokenizer import Tokenizer

DEFAULT_PROMPT_TOKENS = 16


def default_prompt(data_dir: str, n_tokens: int = DEFAULT_PROMPT_TOKENS) -> str:
    """The first (up to) n_tokens tokens of the first validation sample of the dataset in
    data_dir (any storage URI), decoded; "" when it starts with EOS or n_tokens < 1."""
    if n_tokens < 1:
        return ""
    shards = TokenShards(data_dir, "val")
    if len(shards) == 0:
        shards = TokenShards(data_dir, "train")
    info = shards.manifest.tokenizer
    tok = Tokenizer.from_str(storage.read_text(storage.join(shards.data_dir, info.file)))
    ids = [int(i) for i in shards[0][:n_tokens]]
    if info.eos_id in ids:
        ids = ids[: ids.index(info.eos_id)]
    while ids:
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):
            return text
        ids = ids[:-1]  # a character cut between tokens: end at the token before it
    return ""
