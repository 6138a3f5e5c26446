"""Your own data, the first time: the prepare command line with a run config whose trainer
settings are not prepare's business, a validation set that lands where it is named (and the
hashed hold-out's warning without it), and a training run with a 66-token tokenizer. Each
prepare here is one task and the run one worker, so they run in this process, without Ray
(multi-worker runs on Ray are tests/e2e/test_train.py's)."""

from __future__ import annotations

import logging
import math
import string
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from tokenizers import Tokenizer, decoders, models

from data_pipeline.config import EOS_TOKEN, DataConfig
from data_pipeline.manifest import Manifest
from data_pipeline.prepare import main, prepare
from data_pipeline.sources import split_score

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SMOKE = ["+experiment=smoke", "logging.mode=offline"]
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " \n"  # 64


def char_tokenizer(path: Path) -> Path:
    """A 66-token character tokenizer (EOS, <unk> and 64 characters), like one a user brings
    (the same as tests/unit/test_own_data.py's)."""
    vocab = {EOS_TOKEN: 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS_TOKEN])
    tok.save(str(path))
    return path


def text_of(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join("".join(rng.choice(list(string.ascii_lowercase), 5)) for _ in range(n // 6))


def inverting_seed() -> int:
    """A seed with which the hashed hold-out (val_fraction 0.05) puts x_train.txt in val and
    x_val.txt in train (no fallback moves a document: the listing reads none)."""
    for seed in range(10000):
        a, b = split_score("x_train.txt", seed), split_score("x_val.txt", seed)
        if a < 0.05 <= b:
            return seed
    raise AssertionError("no inverting seed")


def test_prepare_command_ignores_trainer_settings(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    proc = run_cli(
        "data_pipeline.prepare", "+experiment=smoke", "trainer.global_batch_size=7",
        f"data.out_dir={out}", timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Manifest.load(out).splits["train"].num_samples > 0
    assert "split: hashed hold-out of document ids" in proc.stdout


def test_named_validation_file_and_hashed_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "mine"
    d.mkdir()
    train, val = d / "x_train.txt", d / "x_val.txt"
    train.write_text(text_of(9000, 1))
    val.write_text(text_of(1000, 2))
    seed = inverting_seed()
    common = dict(seed=seed, seq_len=16, vocab_size=300)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.prepare"):
        hashed = prepare(DataConfig(sources=[str(d)], out_dir=str(tmp_path / "h"), **common))
    tokens = {s: i.num_tokens + i.dropped_tokens for s, i in hashed.splits.items()}
    assert tokens["val"] > tokens["train"]  # the trap: the 90% file became the validation set
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "far from data.val_fraction=0.05" in warnings[0]
    caplog.clear()

    with caplog.at_level(logging.WARNING, logger="data_pipeline.prepare"):
        named = prepare(
            DataConfig(
                sources=[str(train)], val_sources=[str(val)], out_dir=str(tmp_path / "n"), **common
            )
        )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    tokens = {s: i.num_tokens + i.dropped_tokens for s, i in named.splits.items()}
    assert named.num_documents == {"train": 1, "val": 1}
    assert tokens["train"] > 5 * tokens["val"] > 0


def test_train_with_a_66_token_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from trainer.config import load_config
    from trainer.driver.run import run_training

    tok = char_tokenizer(tmp_path / "tok66.json")
    data = tmp_path / "tok66"
    small = [f"data.tokenizer={tok}", "data.vocab_size=66", f"data.out_dir={data}"]
    assert main(["+experiment=smoke", "trainer.global_batch_size=7", *small]) == 0
    assert Manifest.load(data).tokenizer.vocab_size == 66
    capsys.readouterr()
    cfg = load_config(
        [
            *SMOKE, *small, "model.vocab_size=66", f"run.root={tmp_path / 'runs'}", "run.name=t66",
            "trainer.max_steps=4", "trainer.eval_interval=2", "trainer.checkpoint_interval=0",
            "cluster.num_workers=1",
        ]
    )  # fmt: skip
    summary = run_training(cfg)
    assert summary["final_step"] == 4 and math.isfinite(summary["final_val_loss"])
    # no trainer.sample_prompt: the sample continues the start of the validation data
    from data_pipeline.prompt import default_prompt

    prompt = default_prompt(str(data))
    assert prompt and summary["sample"].startswith(prompt)
    assert summary["uniform_loss"] == pytest.approx(math.log(66))
