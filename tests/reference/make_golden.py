"""Writes tests/golden/parity_gpt_tiny_fp32.json from the reference loop (loop.py), never
from raygpt's engine:

    .venv/bin/python -m tests.reference.make_golden

It prepares the parity corpus (corpus.py) in a temporary directory and trains corpus.GPT_TINY
on it for corpus.STEPS steps with the settings corpus.BASE names (written out in RECIPE)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .corpus import BASE, GPT_TINY, STEPS, prepare_corpus, write_corpus
from .loop import Recipe, train

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "parity_gpt_tiny_fp32.json"
# BASE's settings: trainer.max_steps, global_batch_size, micro_batch_size, optim.warmup_steps;
# the rest are raygpt's defaults (trainer.seed 1337, OptimConfig in trainer/config.py).
RECIPE = Recipe(steps=STEPS, global_batch=8, micro_batch=2, warmup=3)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="raygpt-golden-") as tmp:
        corpus = Path(tmp, "corpus")
        corpus.mkdir()
        out_dir = Path(tmp, "data")
        prepare_corpus(write_corpus(corpus), out_dir)
        rows = train(GPT_TINY, out_dir, RECIPE)
    golden = {
        "made_by": "python -m tests.reference.make_golden (the reference loop, not the engine)",
        "overrides": BASE,
        "losses": [r["loss"] for r in rows],
        "consumed_samples": [r["consumed_samples"] for r in rows],
    }
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}: losses {golden['losses']}")


if __name__ == "__main__":
    main()
