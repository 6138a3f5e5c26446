"""Your own data, the first time: a validation set used as named (data.val_sources,
data.split_column), the hashed hold-out's warning, prepare validating only the data group, a
small given tokenizer, the sample's default prompt and random window offsets.

In-process: prepare() runs its tokenize tasks inline here (the `inline` fixture replaces the Ray
tasks with direct calls of the same function), so no Ray starts; tests/e2e/test_own_data_e2e.py
runs the real command lines with Ray.
"""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from procs import tree_digest
from tokenizers import Tokenizer, decoders, models

import data_pipeline.prepare as prepare_mod
from data_pipeline.config import EOS_TOKEN, DataConfig, DataError
from data_pipeline.loader import DistributedLoader, TokenShards, window_shift
from data_pipeline.manifest import (
    MANIFEST_VERSION,
    Manifest,
    ShardInfo,
    SplitInfo,
    TokenizerInfo,
)
from data_pipeline.order import Order
from data_pipeline.prepare import held_out_warning, load_data_config, main, prepare
from data_pipeline.prompt import default_prompt
from data_pipeline.sources import split_of, split_score

CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " \n"  # 64


def char_tokenizer(path: Path) -> Path:
    """A 66-token character tokenizer (EOS, <unk> and 64 characters), like one a user brings."""
    vocab = {EOS_TOKEN: 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS_TOKEN])
    assert tok.get_vocab_size() == 66
    tok.save(str(path))
    return path


def text_of(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list(string.ascii_lowercase), 5)) for _ in range(n // 6)]
    return " ".join(words)


@pytest.fixture
def inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare() without Ray: its tasks run here, one after another (same function, same
    results: the tasks are independent)."""
    import ray

    def run_inline(tasks, fn_kwargs, env=None):
        return {k: prepare_mod.tokenize_task(k, units, **fn_kwargs) for k, units in tasks.items()}

    monkeypatch.setattr(prepare_mod, "_run_tasks", run_inline)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # "running": prepare starts none


@pytest.fixture
def tok66(tmp_path: Path) -> Path:
    return char_tokenizer(tmp_path / "tok66.json")


@pytest.fixture
def named_files(tmp_path: Path) -> tuple[Path, Path]:
    """x_train.txt (90% of the text) and x_val.txt (10%) side by side."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "x_train.txt").write_text(text_of(9000, 1))
    (d / "x_val.txt").write_text(text_of(1000, 2))
    return d / "x_train.txt", d / "x_val.txt"


def inverting_seed() -> int:
    """A seed with which the hashed hold-out (val_fraction 0.05) puts x_train.txt in val and
    x_val.txt in train."""
    for seed in range(10000):
        a, b = split_score("x_train.txt", seed), split_score("x_val.txt", seed)
        if a < 0.05 <= b:
            return seed
    raise AssertionError("no inverting seed")


# ---------------------------------------------------------------------------- the split


def test_hashed_split_inverts_named_files_and_says_so(
    named_files: tuple[Path, Path], tmp_path: Path, inline: None, caplog: pytest.LogCaptureFixture
) -> None:
    train, val = named_files
    seed = inverting_seed()
    cfg = DataConfig(
        sources=[str(train.parent)], seed=seed, seq_len=16, vocab_size=300,
        out_dir=str(tmp_path / "hashed"),
    )  # fmt: skip
    assert split_of("x_train.txt", 0.05, seed) == "val"  # the trap: 90% of the text in val
    with caplog.at_level(logging.WARNING, logger="data_pipeline.prepare"):
        manifest = prepare(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "of the tokens (1 of 2 documents) in val" in warnings[0]
    assert "data.val_fraction=0.05" in warnings[0] and "data.val_sources" in warnings[0]
    assert held_out_warning(cfg, manifest) == warnings[0]


def test_val_sources_land_where_named(
    named_files: tuple[Path, Path],
    tmp_path: Path,
    tok66: Path,
    inline: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    train, val = named_files
    cfg = DataConfig(
        sources=[str(train)], val_sources=[str(val)], seed=inverting_seed(), seq_len=16,
        tokenizer=str(tok66), out_dir=str(tmp_path / "named"),
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="data_pipeline.prepare"):
        manifest = prepare(cfg)
    assert manifest.num_documents == {"train": 1, "val": 1}
    assert manifest.stats["chars"] == {"train": len(train.read_text()), "val": len(val.read_text())}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    for split, path in (("train", train), ("val", val)):
        info = manifest.splits[split]  # one character per token, + EOS
        assert info.num_tokens + info.dropped_tokens == len(path.read_text()) + 1
    assert "x_val.txt" in manifest.stats["split"]
    assert manifest.settings["val_sources"] == [str(val)]
    # datasets prepared without them keep their settings (no new keys): still "the same"
    assert "val_sources" not in prepare_mod.settings_of(DataConfig())


def test_split_column_routes_rows(tmp_path: Path, tok66: Path, inline: None) -> None:
    texts = [text_of(300, i) for i in range(6)]
    splits = ["train", "val", "train", "train", "val", "train"]
    pq.write_table(pa.table({"text": texts, "split": splits}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "split": s}) for t, s in zip(texts, splits)) + "\n"
    )
    for name in ("a.parquet", "b.jsonl"):
        cfg = DataConfig(
            sources=[str(tmp_path / name)], split_column="split", seq_len=16,
            tokenizer=str(tok66), out_dir=str(tmp_path / f"out-{name}"),
        )  # fmt: skip
        manifest = prepare(cfg)
        assert manifest.num_documents == {"train": 4, "val": 2}
        assert manifest.stats["chars"]["val"] == len(texts[1]) + len(texts[4])
        info = manifest.splits["val"]
        assert info.num_tokens + info.dropped_tokens == len(texts[1]) + len(texts[4]) + 2


def test_bad_split_inputs_one_line_exit_2_nothing_prepared(
    named_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    train, val = named_files
    pq.write_table(
        pa.table({"text": ["a b c", "d e f", "g h i"], "split": ["train", "val", "test"]}),
        tmp_path / "rows.parquet",
    )
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"text": "abc", "split": "val"}) + "\n"
        + json.dumps({"text": "def", "split": "Validation"}) + "\n"
    )  # fmt: skip
    out = tmp_path / "out"
    cases = [
        (
            [f"data.sources=['{train.parent}']", f"data.val_sources=['{val}']"],
            f"error: data.val_sources: '{val}' is also matched by data.sources; a validation "
            "file must not be trained on (narrow data.sources)",
        ),
        (
            [f"data.sources=['{val}']", f"data.val_sources=['{val}']"],
            f"error: data.val_sources: '{val}' is also in data.sources",
        ),
        (
            [f"data.sources=['{tmp_path / 'rows.parquet'}']", "data.split_column=split"],
            f"error: parquet file '{tmp_path / 'rows.parquet'}' row 2: data.split_column 'split' "
            "is 'test', must be 'train' or 'val'",
        ),
        (
            [f"data.sources=['{tmp_path / 'rows.jsonl'}']", "data.split_column=split"],
            f"error: jsonl file '{tmp_path / 'rows.jsonl'}' line 2: data.split_column 'split' "
            "is 'Validation', must be 'train' or 'val'",
        ),
    ]
    for overrides, expected in cases:
        assert main(["data=parquet", *overrides, f"data.out_dir={out}"]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith(expected), (errors, expected)
        assert not out.exists() and not list(tmp_path.glob("out.*"))


# ---------------------------------------------------------------------------- what prepare checks


def test_prepare_validates_the_data_group_only(tmp_path: Path, inline: None) -> None:
    run_only = ["trainer.global_batch_size=7", "cluster.num_workers=64", "model.vocab_size=10"]
    cfg = load_data_config(["+experiment=smoke", *run_only, f"data.out_dir={tmp_path / 'd'}"])
    assert cfg.seq_len == 64 and cfg.vocab_size == 512 and cfg.out_dir == str(tmp_path / "d")
    out = tmp_path / "smoke"
    args = ["+experiment=smoke", *run_only, f"data.out_dir={out}"]
    assert main(args) == 0
    assert Manifest.load(out).num_documents["train"] >= 1


def test_small_given_tokenizer_is_accepted(
    tmp_path: Path, tok66: Path, inline: None, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(DataError, match="data.vocab_size: must be >= 257, got 66"):
        DataConfig(vocab_size=66)  # the floor of the BPE prepare trains ...
    DataConfig(vocab_size=66, tokenizer=str(tok66))  # ... not of a given tokenizer
    small = ["+experiment=smoke", f"data.tokenizer={tok66}", "data.max_documents=40"]
    for extra in ([], ["data.vocab_size=66"]):  # the default, or explicitly the right size
        out = tmp_path / f"tok66-{len(extra)}"
        assert main([*small, *extra, f"data.out_dir={out}"]) == 0, capsys.readouterr().err
        assert Manifest.load(out).tokenizer.vocab_size == 66

    from trainer.config import ConfigError, load_config
    from trainer.driver.preflight import check_inputs

    run = [*small, "data.vocab_size=66", f"data.out_dir={tmp_path / 'fresh'}"]
    cfg = load_config([*run, "model.vocab_size=66"])
    check_inputs(cfg)
    assert cfg.data.vocab_size == 66
    with pytest.raises(ConfigError, match=r"model.vocab_size \(65\) is smaller than the tokeni"):
        check_inputs(load_config([*run, "model.vocab_size=65"]))


def test_explicit_vocab_size_contradicting_the_tokenizer(
    tmp_path: Path, tok66: Path, inline: None, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "ds"
    base = ["+experiment=smoke", f"data.tokenizer={tok66}", "data.max_documents=40"]
    assert main([*base, f"data.out_dir={out}"]) == 0
    capsys.readouterr()
    before = tree_digest(tmp_path)
    assert main([*base, "data.vocab_size=512", f"data.out_dir={out}", "--overwrite"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"error: data.vocab_size=512 conflicts with data.tokenizer '{tok66}', which has 66 "
        "tokens: data.vocab_size sizes the BPE prepare trains; with a given tokenizer leave it "
        "unset (or set it to 66)"
    ]
    assert tree_digest(tmp_path) == before


# ---------------------------------------------------------------------------- the sample prompt


def test_default_prompt_is_the_start_of_the_validation_data(
    tmp_path: Path, tok66: Path, inline: None
) -> None:
    from trainer.config import TrainerConfig, load_config

    assert TrainerConfig().sample_prompt is None
    assert load_config(["+experiment=smoke"], default_name="t").trainer.sample_prompt is None

    val = tmp_path / "val"
    val.mkdir()
    (val / "a.txt").write_text("Hi there")
    (val / "b.txt").write_text("The quick brown fox jumps over the lazy dog " * 3)
    (tmp_path / "train.txt").write_text(text_of(2000, 3))
    out = tmp_path / "ds"
    prepare(
        DataConfig(
            sources=[str(tmp_path / "train.txt")], val_sources=[str(val)], seq_len=16,
            tokenizer=str(tok66), out_dir=str(out),
        )
    )  # fmt: skip
    assert default_prompt(str(out), 16) == "Hi there"  # stops at the document's end (EOS)
    assert default_prompt(str(out), 3) == "Hi "
    assert default_prompt(str(out), 0) == ""


# ---------------------------------------------------------------------------- random windows

ROW = 9  # seq_len 8


def stream_dataset(root: Path, shard_rows: list[int]) -> TokenShards:
    """Rows of one token stream: token value = its position in the stream."""
    root.mkdir(parents=True, exist_ok=True)
    shards, first = [], 0
    for k, rows in enumerate(shard_rows):
        values = pa.array(np.arange(first * ROW, (first + rows) * ROW), type=pa.int32())
        name = f"train-00000-{k:03d}.parquet"
        pq.write_table(pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, ROW)}),
                       root / name)  # fmt: skip
        shards.append(ShardInfo(file=name, rows=rows))
        first += rows
    Manifest(
        version=MANIFEST_VERSION, name="stream",
        tokenizer=TokenizerInfo(file="tokenizer.json", sha256="0" * 64, vocab_size=10**6, eos_id=0),
        seq_len=ROW - 1,
        splits={"train": SplitInfo(shards=shards, num_samples=first, num_tokens=first * ROW),
                "val": SplitInfo()},
        sources=["stream"], num_documents={"train": first, "val": 0}, settings={},
        fingerprint="", created="2024-01-01T00:00:00+00:00",
    ).save(root)  # fmt: skip
    return TokenShards(str(root), "train")


def windows_of(loader: DistributedLoader, steps: int) -> list[np.ndarray]:
    out = []
    for _ in range(steps):
        for x, y in loader.next_step():
            for xi, yi in zip(x.numpy(), y.numpy()):
                assert (yi[:-1] == xi[1:]).all()
                out.append(np.concatenate([xi, yi[-1:]]))
    return out


def test_random_window_offsets_keep_exactly_once(tmp_path: Path) -> None:
    shards = stream_dataset(tmp_path / "ds", [7, 5, 9, 4])  # 25 rows -> 24 windows an epoch
    args = dict(global_batch=8, micro_batch=2, seed=3, window_offset="random")
    loader = DistributedLoader(shards, dp_rank=0, dp_size=1, **args)
    assert loader.num_samples == 24 and loader.steps_per_epoch == 3
    windows = windows_of(loader, 6)  # two epochs
    shifts = [window_shift(3, e, ROW) for e in (0, 1)]
    assert len(set(shifts)) == 2 and set(shifts) != {0}
    for epoch, shift in enumerate(shifts):
        starts = sorted(int(w[0]) for w in windows[epoch * 24 : (epoch + 1) * 24])
        assert starts == [shift + k * ROW for k in range(24)]  # disjoint, each window once
    for w in windows:
        assert (np.diff(w) == 1).all()  # a contiguous stretch of the stream, across rows
    # any data-parallel size, and a resume at any step: the same windows
    for dp_size in (2, 4):
        ranks = [
            DistributedLoader(shards, dp_rank=r, dp_size=dp_size, **args) for r in range(dp_size)
        ]
        for step in range(6):
            got = sorted(int(w[0]) for r in ranks for w in windows_of(r, 1))
            assert got == sorted(int(w[0]) for w in windows[step * 8 : (step + 1) * 8])
    state = DistributedLoader(
        shards, dp_rank=0, dp_size=1, consumed_samples=32, **args
    ).state_dict()
    assert state == {
        "consumed_samples": 32, "seed": 3, "window_offset": "random", **Order().state()
    }  # fmt: skip
    resumed = DistributedLoader(shards, dp_rank=0, dp_size=1, global_batch=8, micro_batch=2, seed=9)
    resumed.load_state_dict(state)  # the checkpoint's order wins
    assert [int(w[0]) for w in windows_of(resumed, 2)] == [int(w[0]) for w in windows[32:48]]
    packed = DistributedLoader(shards, dp_rank=0, dp_size=1, global_batch=8, micro_batch=2, seed=3)
    assert packed.state_dict() == {"consumed_samples": 0, "seed": 3, **Order().state()}
    assert all(int(w[0]) % ROW == 0 for w in windows_of(packed, 3))
    with pytest.raises(ValueError, match="window_offset 'random' needs at least 2 rows"):
        DistributedLoader(stream_dataset(tmp_path / "one", [1]), dp_rank=0, dp_size=1,
                          global_batch=1, micro_batch=1, seed=0, window_offset="random")  # fmt: skip
    with pytest.raises(DataError, match="data.window_offset: 'shifted' is not one of"):
        DataConfig(window_offset="shifted")
