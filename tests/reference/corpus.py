"""The parity tests' corpus and run settings, shared by tests/dist/test_parity.py,
tests/dist/test_reference_parity.py and make_golden.py (the golden file's maker)."""

from __future__ import annotations

import random
from pathlib import Path

from models.gpt import GPTConfig

STEPS = 10
# The smoke experiment's gpt-tiny (2 layers, d_model 64, 4 heads) on a 512-token vocabulary,
# fp32, global batch 8 in micro batches of 2.
BASE = [
    "+experiment=smoke", "model=gpt-tiny", "model.vocab_size=512", "model.block_size=64",
    "precision=fp32", "logging.mode=disabled", f"trainer.max_steps={STEPS}",
    "trainer.micro_batch_size=2", "trainer.global_batch_size=8", "trainer.eval_interval=0",
    "trainer.checkpoint_interval=0", "trainer.sample_tokens=0", "trainer.keep_last=1",
    "optim.warmup_steps=3",
]  # fmt: skip
# The same model as BASE resolves to, written out for the reference (a test holds them equal).
GPT_TINY = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, d_model=64)


def write_corpus(directory: Path) -> Path:
    """A synthetic corpus (not the interpreter's stdlib): the same bytes on every machine."""
    rng = random.Random(1234)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7)))
             for _ in range(300)]  # fmt: skip
    for d in range(60):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(40)]
        (directory / f"doc{d:03d}.txt").write_text("\n".join(lines) + "\n")
    return directory


def prepare_corpus(corpus: Path, out_dir: Path) -> list[str]:
    """Prepares `corpus` into out_dir (tokenizer + shards, as raygpt's prepare makes them: the
    prepared data are a shared input of both sides); the data overrides naming it."""
    from data_pipeline.prepare import prepare
    from trainer.config import load_config

    data = [f"data.sources=[{corpus}]", f"data.out_dir={out_dir}"]
    prepare(load_config([*BASE, *data]).data)
    return data
