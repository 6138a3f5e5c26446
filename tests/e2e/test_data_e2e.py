"""prepare() end to end with Ray tasks (moved from tests/unit/test_data.py: unit tests start no
Ray): tiny corpora in tmp_path; one Ray instance per module."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from data_pipeline.config import EOS_TOKEN, DataConfig, DataError
from data_pipeline.loader import DistributedLoader, TokenShards
from data_pipeline.manifest import Manifest
from data_pipeline.prepare import prepare
from data_pipeline.sources import split_of, stdlib_root
from data_pipeline.tokenizer import file_sha256

pytestmark = pytest.mark.slow

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi rho".split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(
        rng.choice(WORDS) + rng.choice(["", ",", ".\n", "()", " = 1"]) for _ in range(n)
    )


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[tuple[str, str]]]:
    """Text files, a JSONL file and a Parquet file. Returns (sources, [(doc id, text)] in the
    expected listing order, empty documents excluded)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs: list[tuple[str, str]] = []
    texts = root / "texts"
    (texts / "sub").mkdir(parents=True)
    for i in range(8):
        name = f"doc{i}.txt" if i < 6 else f"sub/doc{i}.txt"
        text = words(rng, rng.randint(40, 250))
        (texts / name).write_text(text)
        docs.append((name, text))
    docs.sort()
    (texts / "empty.txt").write_text("  \n")  # dropped: empty
    (texts / "data.bin").write_bytes(b"\x00\xff")  # ignored: unknown extension
    (texts / ".hidden.txt").write_text("hidden")  # ignored: hidden
    docs.sort()
    lines, offset = [], 0  # a JSONL document's id: the byte offset of its line
    for row in range(14):
        text = "" if row == 5 else words(rng, rng.randint(10, 120))
        lines.append("" if row == 9 else json.dumps({"id": row, "text": text}))
        if row not in (5, 9):
            docs.append((f"docs.jsonl@{offset}", text))
        offset += len(lines[-1].encode()) + 1
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    column = [None if row == 3 else words(rng, rng.randint(10, 120)) for row in range(10)]
    pq.write_table(pa.table({"text": column, "n": list(range(10))}), root / "rows.parquet")
    docs += [(f"rows.parquet#{row}", t) for row, t in enumerate(column) if t is not None]
    return [str(texts), f"file://{root}/docs.jsonl", f"{root}/*.parquet"], docs


def expected_streams(
    out_dir: Path, docs: list[tuple[str, str]], val_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Each split's token stream, re-tokenized here with the saved tokenizer.json."""
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    eos = tok.token_to_id(EOS_TOKEN)
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for doc_id, text in docs:
        split = split_of(doc_id, val_fraction, seed)
        streams[split] += tok.encode(text, add_special_tokens=False).ids + [eos]
    return {k: np.array(v, dtype=np.int64) for k, v in streams.items()}


def read_split(out_dir: Path, split: str) -> list[np.ndarray]:
    """Rows of each shard of a split, in manifest order."""
    manifest = Manifest.load(out_dir)
    return [
        np.array(pq.read_table(out_dir / s.file).column("tokens").to_pylist(), dtype=np.int64)
        for s in manifest.splits[split].shards
    ]


def find_window(stream: np.ndarray, window: np.ndarray) -> list[int]:
    views = np.lib.stride_tricks.sliding_window_view(stream, len(window))
    return np.nonzero((views == window).all(axis=1))[0].tolist()


# ---------------------------------------------------------------------------- prepare (Ray)


def test_prepare_round_trip_single_task(
    ray_session: None, corpus: tuple[list[str], list], tmp_path: Path
) -> None:
    srcs, docs = corpus
    cfg = DataConfig(
        sources=srcs, vocab_size=320, seq_len=16, val_fraction=0.25, num_tasks=1,
        samples_per_shard=40, out_dir=str(tmp_path / "ds"),
    )  # fmt: skip
    manifest = prepare(cfg)
    out = Path(cfg.out_dir)
    streams = expected_streams(out, docs, cfg.val_fraction, cfg.seed)
    counts = {s: sum(split_of(d, 0.25, cfg.seed) == s for d, _ in docs) for s in ("train", "val")}
    assert counts["val"] > 0 and manifest.num_documents == counts
    assert manifest.tokenizer.sha256 == file_sha256(out / "tokenizer.json")
    for split, stream in streams.items():
        shards = read_split(out, split)
        rows = np.concatenate(shards)
        assert rows.shape == (len(stream) // 17, 17)
        np.testing.assert_array_equal(rows.reshape(-1), stream[: rows.size])
        info = manifest.splits[split]
        assert info.num_samples == len(rows) and info.num_tokens == rows.size
        assert [len(s) for s in shards] == [s.rows for s in info.shards]
        assert all(s.rows <= 40 for s in info.shards)
        assert {s.file.split("-")[1] for s in info.shards} == {"00000"}
        # the loader returns the same rows, identity order for eval
        loader = DistributedLoader(
            TokenShards(cfg.out_dir, split), global_batch=4, micro_batch=2, dp_rank=0,
            dp_size=1, seed=0, shuffle=False,
        )  # fmt: skip
        (x0, y0), (x1, y1) = loader.next_step()
        np.testing.assert_array_equal(x0.numpy(), rows[0:2, :-1])
        np.testing.assert_array_equal(y1.numpy(), rows[2:4, 1:])
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".parquet")) == [
        "manifest.json",
        "tokenizer.json",
    ]


def test_prepare_several_tasks_is_deterministic(
    ray_session: None, corpus: tuple[list[str], list], tmp_path: Path
) -> None:
    srcs, docs = corpus
    results = []
    for name in ("a", "b"):
        cfg = DataConfig(
            sources=srcs, vocab_size=320, seq_len=16, val_fraction=0.25, num_tasks=3,
            out_dir=str(tmp_path / name),
        )  # fmt: skip
        manifest = prepare(cfg)
        assert manifest.stats["num_tasks"] == 3
        results.append((manifest, {s: read_split(tmp_path / name, s) for s in ("train", "val")}))
    (m_a, rows_a), (m_b, rows_b) = results
    assert m_a.splits == m_b.splits and m_a.tokenizer == m_b.tokenizer
    for split in ("train", "val"):
        assert len(rows_a[split]) == len(rows_b[split])
        for a, b in zip(rows_a[split], rows_b[split]):
            np.testing.assert_array_equal(a, b)
    streams = expected_streams(tmp_path / "a", docs, 0.25, 1234)
    train_tasks = {s.file.split("-")[1] for s in m_a.splits["train"].shards}
    assert len(train_tasks) == 3
    for split, stream in streams.items():
        last = -1
        for shard in rows_a[split]:  # each task's rows: a contiguous window, tasks in order
            flat = shard.reshape(-1)
            where = find_window(stream, flat)
            assert len(where) == 1 and where[0] > last
            last = where[0]
        dropped = m_a.splits[split].dropped_tokens
        assert m_a.splits[split].num_tokens + dropped == len(stream)
        assert dropped < 3 * 17


def test_prepare_is_idempotent_and_guards_settings(ray_session: None, tmp_path: Path) -> None:
    out = tmp_path / "stdlib"
    cfg = DataConfig(
        out_dir=str(out), max_documents=20, vocab_size=300, seq_len=32, val_fraction=0.2
    )
    first = prepare(cfg)
    assert sum(first.num_documents.values()) == 20 and first.num_documents["val"] >= 1
    assert first.sources == [stdlib_root()]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(DataConfig(**{**cfg.__dict__}))
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    changed = DataConfig(**{**cfg.__dict__, "seq_len": 16})
    with pytest.raises(
        DataError, match=r"\(changed: seq_len\); pick another data.out_dir or pass overwrite"
    ):
        prepare(changed)
    assert Manifest.load(out) == first
    rebuilt = prepare(changed, overwrite=True)
    assert rebuilt.seq_len == 16 and Manifest.load(out) == rebuilt
    on_disk = {p.name for p in out.iterdir()}
    listed = {s.file for split in rebuilt.splits.values() for s in split.shards}
    assert on_disk == listed | {"manifest.json", "tokenizer.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stdlib"]  # no tmp/old dirs left
    # a given tokenizer.json is copied byte for byte and its sha256 is recorded
    given = DataConfig(
        **{
            **changed.__dict__,
            "tokenizer": str(out / "tokenizer.json"),
            "out_dir": str(tmp_path / "given"),
        }
    )
    with_given = prepare(given)
    assert with_given.tokenizer.sha256 == rebuilt.tokenizer.sha256
    assert with_given.settings["tokenizer_sha256"] == rebuilt.tokenizer.sha256
    assert with_given.splits == rebuilt.splits
