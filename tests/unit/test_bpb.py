"""Validation bits per byte: the formula (hand-computed values), the manifest's byte counts
(prepare records each split's UTF-8 bytes; an older manifest has none and reads back as it
was), eval.jsonl / W&B rows and the summary table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.manifest import Manifest, SplitInfo
from trainer.worker.observability.bpb import bits_per_byte, missing_note, val_bits_per_byte

LN2 = 0.6931471805599453  # ln 2, written out


def test_bits_per_byte_hand_computed() -> None:
    # 2 nats/token over 4 bytes/token: 0.5 nats/byte = 0.5 / ln 2 bits/byte
    assert bits_per_byte(2.0, 4.0) == pytest.approx(0.7213475204444817, rel=1e-12)
    # ln 2 nats/token at 1 byte/token is exactly one bit per byte
    assert bits_per_byte(LN2, 1.0) == pytest.approx(1.0, rel=1e-12)
    # 3.5 nats/token, 3.5 bytes/token: 1 nat/byte = 1.4426950408889634 bits/byte
    assert bits_per_byte(3.5, 3.5) == pytest.approx(1.4426950408889634, rel=1e-12)
    assert bits_per_byte(2.0, None) is None


def test_mixture_bits_per_byte_is_the_sources_mean_and_none_if_one_lacks_bytes() -> None:
    # a: 2 nats / 4 bytes = 0.5 nats/byte; b: 3 nats / 2 bytes = 1.5 nats/byte; mean 1 nat/byte
    mean, each = val_bits_per_byte({"a": 2.0, "b": 3.0}, {"a": 4.0, "b": 2.0})
    assert mean == pytest.approx(1 / LN2, rel=1e-12)
    assert each == pytest.approx({"a": 0.5 / LN2, "b": 1.5 / LN2}, rel=1e-12)
    mean, each = val_bits_per_byte({"a": 2.0, "b": 3.0}, {"a": 4.0, "b": None})
    assert mean is None and list(each) == ["a"]
    note = missing_note({"a": 4.0, "b": None}, {"a": "/d/a", "b": "/d/b"})
    assert note and "'/d/b'" in note and "'/d/a'" not in note and "--overwrite" in note
    assert missing_note({"": 4.0}, {"": "/d"}) is None


def test_split_bytes_per_token_counts_dropped_tokens() -> None:
    # 900 stored + 100 dropped tokens made from 3,500 bytes: 3.5 bytes per token
    split = SplitInfo(num_samples=9, num_tokens=900, dropped_tokens=100, num_bytes=3500)
    assert split.bytes_per_token == 3.5
    assert split.to_dict()["num_bytes"] == 3500
    assert SplitInfo(num_tokens=900).bytes_per_token is None


def _manifest_dict(**split: int) -> dict:
    return {
        "version": 2, "name": "x", "seq_len": 4, "sources": [], "settings": {},
        "fingerprint": "f", "stats": {}, "num_documents": {"train": 1, "val": 1},
        "tokenizer": {"file": "tokenizer.json", "sha256": "s", "vocab_size": 8, "eos_id": 0},
        "splits": {"train": {"shards": [], "num_samples": 0, "num_tokens": 0,
                             "dropped_tokens": 0, **split},
                   "val": {"shards": [], "num_samples": 0, "num_tokens": 0,
                           "dropped_tokens": 0}},
    }  # fmt: skip


def test_a_manifest_without_byte_counts_reads_back_as_it_was() -> None:
    old = _manifest_dict()
    m = Manifest.from_dict(old)
    assert m.splits["train"].num_bytes is None and m.to_dict() == old
    new = Manifest.from_dict(_manifest_dict(num_bytes=12))
    assert new.splits["train"].num_bytes == 12 and new.to_dict()["splits"]["train"]["num_bytes"]


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """One prepare task runs in this process: Ray must not start."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray would start")

    monkeypatch.setattr(ray, "init", refuse)


def test_prepare_records_each_splits_utf8_bytes(tmp_path: Path, no_ray) -> None:
    """Files with multi-byte characters, one document each: the splits' byte counts add up
    to the files' sizes on disk (not their character counts)."""
    from data_pipeline.prepare import prepare
    from trainer.config import load_config

    src = tmp_path / "src"
    src.mkdir()
    texts = {f"f{i}.py": ("déjà vu € " * (40 + 7 * i)) + f"# {i}\n" for i in range(12)}
    for name, text in texts.items():
        (src / name).write_text(text, encoding="utf-8")
    size = sum((src / n).stat().st_size for n in texts)
    chars = sum(len(t) for t in texts.values())
    assert size > chars  # é, à and € are 2, 2 and 3 bytes
    cfg = load_config(["+experiment=smoke", f"data.out_dir={tmp_path / 'out'}",
                       f"data.sources=[{src}]", "data.max_documents=null",
                       "data.val_fraction=0.3", "data.seed=3", "data.num_tasks=1"]).data  # fmt: skip
    manifest = prepare(cfg)
    splits = manifest.splits
    assert splits["train"].num_bytes + splits["val"].num_bytes == size
    assert all(s.num_bytes > 0 for s in splits.values())
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sum(s["num_bytes"] for s in on_disk["splits"].values()) == size
    for s in splits.values():
        expected = s.num_bytes / (s.num_tokens + s.dropped_tokens)
        assert s.bytes_per_token == expected


def test_eval_rows_wandb_and_table_carry_bits_per_byte(tmp_path: Path, capsys) -> None:
    from trainer.config import LoggingConfig
    from trainer.driver.report import print_summary
    from trainer.worker.observability.logger import RunLogger

    class FakeRun:  # W&B itself is not under test: what raygpt hands it is
        def __init__(self) -> None:
            self.logged: list[tuple[dict, int]] = []

        def log(self, values: dict, step: int) -> None:
            self.logged.append((values, step))

    logger = RunLogger(tmp_path, LoggingConfig(mode="disabled"), run_name="b", group=None,
                       wandb_id="x", config={}, max_steps=3, start_step=0)  # fmt: skip
    logger.wandb = FakeRun()
    logger.log_eval(2, 2.5, {"web": 2.0, "code": 3.0}, val_bpb=1.25,
                    bpb_by_source={"web": 1.0, "code": 1.5})  # fmt: skip
    logger.log_eval(3, 2.0)  # no byte counts: no bits per byte
    rows = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert rows[0]["val_bpb"] == 1.25 and rows[0]["val_bpb/web"] == 1.0
    assert rows[0]["val_loss/code"] == 3.0 and "val_bpb" not in rows[1]
    values, step = logger.wandb.logged[0]
    assert step == 2 and values["val/bpb"] == 1.25 and values["val/bpb/code"] == 1.5
    assert values["val/loss/web"] == 2.0 and "val/bpb" not in logger.wandb.logged[1][0]
    assert "val_bpb 1.2500" in capsys.readouterr().out
    logger.wandb = None
    logger.close()

    print_summary({"final_val_loss": 2.0, "final_val_bpb": 0.9876, "final_step": 3})
    out = capsys.readouterr().out
    assert "val bits per byte" in out and "0.9876" in out
    print_summary({"final_val_loss": 2.0, "final_step": 3})  # an old manifest: shown as -
    row = [x for x in capsys.readouterr().out.splitlines() if "val bits per byte" in x]
    assert len(row) == 1 and "-" in row[0] and "0.9876" not in row[0]
