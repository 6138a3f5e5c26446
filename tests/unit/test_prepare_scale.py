"""Prepare at scale, in-process: listing from metadata (byte ranges of JSONL files, row-group
ranges of Parquet files), the bounded tokenizer sample, the deterministic manifest, the ledger
of other settings, and the bad input of large sources (one line, exit 2, nothing left).
prepare's tasks run in this process here (`inline`); tests/e2e/test_prepare_resume.py kills
and resumes real prepares on Ray."""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from procs import tree_digest

import data_pipeline.prepare as prep
from data_pipeline.config import DataConfig, DataError
from data_pipeline.manifest import Manifest, read_manifest
from data_pipeline.sources import (
    WorkUnit,
    byte_ranges,
    list_work_units,
    plan_units,
    read_documents,
    split_of,
)

# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare() without Ray: its tasks run here, one after another (the same function)."""
    import ray

    def run_inline(tasks, fn_kwargs, env=None):
        return {k: prep.tokenize_task(k, units, **fn_kwargs) for k, units in tasks.items()}

    monkeypatch.setattr(prep, "_run_tasks", run_inline)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # "running": prepare starts none


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray would start: the bad input was not stopped at the listing")

    monkeypatch.setattr(ray, "init", refuse)


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def jsonl_bytes(
    rng: random.Random, n: int, longest: int = 600
) -> tuple[bytes, list[tuple[int, str]]]:
    """A JSONL file of n lines (CRLF and LF endings, blank lines of both kinds from 17 lines
    on, texts of 1 to `longest` characters: lines of 10 to 2000 bytes by default, the last
    without a newline) and its (line start offset, text) pairs, counted here."""
    data, expected = b"", []
    for i in range(n):
        if i % 11 == 5:
            data += b"\n" if i % 2 else b"  \r\n"  # blank lines: no document
            continue
        text = "".join(rng.choice("abcdefgh \u00e9") for _ in range(rng.randint(1, longest)))
        expected.append((len(data), text))
        ending = b"" if i == n - 1 else (b"\r\n" if i % 3 == 0 else b"\n")
        data += json.dumps({"text": text}).encode() + ending
    return data, expected


# ---------------------------------------------------------------------------- byte ranges


def check_byte_ranges(path: Path, data: bytes, expected: list, sizes: list[int]) -> WorkUnit:
    """Cut the JSONL file `data` into byte ranges of each size: the ranges tile the file and
    read each of its lines exactly once, in order. Returns the whole file's unit."""
    path.write_bytes(data)
    whole = WorkUnit(path=str(path), format="jsonl", name=path.name, size=len(data))
    want = [(f"{path.name}@{pos}", text) for pos, text in expected]
    for unit_bytes in sizes:
        units = byte_ranges(whole, unit_bytes)
        assert units[0].start == 0 and units[-1].stop is None
        assert all(a.stop == b.start for a, b in zip(units, units[1:]))
        got = [(d.id, d.text) for u in units for d in read_documents(u)]
        assert got == want, unit_bytes
    return whole


def test_byte_ranges_read_every_line_exactly_once(tmp_path: Path) -> None:
    rng = random.Random(0)
    data, expected = jsonl_bytes(rng, 60)
    assert not data.endswith(b"\n")
    sizes = [64, 100, 999, len(data) - 1, len(data), len(data) * 2]
    sizes += [rng.randint(1, len(data)) for _ in range(20)]
    whole = check_byte_ranges(tmp_path / "docs.jsonl", data, expected, sizes)
    # A cut at every byte, and cuts 2, 3 and 7 bytes apart, on a file of the same kinds of line
    # and ending with shorter lines (about 1 kB: each range opens the file, and 24 kB of
    # one-byte ranges took 20 s)
    short, short_expected = jsonl_bytes(random.Random(1), 24, longest=40)
    assert not short.endswith(b"\n") and b"\n\n" in short and b"\n  \r\n" in short
    check_byte_ranges(tmp_path / "short.jsonl", short, short_expected, [1, 2, 3, 7])
    # a cut exactly at a line start: that line belongs to the range starting there
    second = expected[1][0]
    head = replace(whole, stop=second)
    tail = replace(whole, start=second)
    assert [d.text for d in read_documents(head)] == [expected[0][1]]
    assert next(iter(read_documents(tail))).id == f"docs.jsonl@{second}"


def test_jsonl_listing_cuts_by_the_task_memory_budget(tmp_path: Path) -> None:
    rng = random.Random(1)
    data, expected = jsonl_bytes(rng, 400)
    (tmp_path / "a.jsonl").write_bytes(data)
    cfg = DataConfig(sources=[str(tmp_path)], task_memory_bytes=1 << 16)
    units = plan_units(cfg, prep.unit_bytes(cfg)).units
    assert prep.unit_bytes(cfg) == 1 << 14 and len(units) == -(-len(data) // (1 << 14))
    assert sum(u.size for u in units) == len(data)
    assert [d.text for u in units for d in read_documents(u)] == [t for _, t in expected]


# ---------------------------------------------------------------------------- Parquet


def parquet_file(path: Path, rows: int, group: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [f"row {i} " + "x" * rng.randint(50, 400) for i in range(rows)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=group, compression="zstd")
    return texts


def damage_row_group(path: Path, index: int) -> None:
    """Flip bytes inside row group `index`'s column chunk, leaving the footer valid."""
    column = pq.ParquetFile(path).metadata.row_group(index).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start + 40, start + column.total_compressed_size - 8, 5):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_parquet_units_come_from_the_footer(tmp_path: Path) -> None:
    texts = parquet_file(tmp_path / "big.parquet", 500, 50)
    damage_row_group(tmp_path / "big.parquet", 6)  # the listing does not read any page
    meta = pq.ParquetFile(tmp_path / "big.parquet").metadata
    group_bytes = meta.row_group(0).column(0).total_compressed_size
    units = plan_units(DataConfig(sources=[str(tmp_path)]), group_bytes * 3).units
    assert len(units) >= 3 and all(u.start % 50 == 0 for u in units)
    assert [(u.start, u.stop) for u in units] == [
        (a.start, b.start) for a, b in zip(units, units[1:])
    ] + [(units[-1].start, 500)]
    good = [u for u in units if u.stop <= 300]
    assert [d.id for u in good for d in read_documents(u)] == [
        f"big.parquet#{i}" for i in range(good[-1].stop)
    ]
    assert [d.text for u in good for d in read_documents(u)] == texts[: good[-1].stop]


def test_a_damaged_row_group_in_the_middle_is_named(
    tmp_path: Path, inline: None, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    parquet_file(src / "big.parquet", 400, 40)
    damage_row_group(src / "big.parquet", 5)
    before = tree_digest(tmp_path)
    rc = prep.main(["data=parquet", f"data.sources=[{src}]", f"data.out_dir={tmp_path / 'out'}",
                    "data.vocab_size=300", "data.seq_len=16"])  # fmt: skip
    line = one_error(capsys)
    assert rc == 2
    assert line.startswith(
        f"error: parquet file '{src / 'big.parquet'}' row group 5 (rows 200-239) cannot be read "
        "as Parquet: "
    ), line
    assert tree_digest(tmp_path) == before  # no out_dir, no partial build left


# ---------------------------------------------------------------------------- too large


def test_unsplittable_sources_larger_than_the_task_budget(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture
) -> None:
    budget = 1 << 16
    big_text = tmp_path / "one.txt"
    big_text.write_text("word " * 20000)  # 100,000 bytes: one document
    zipped = tmp_path / "docs.jsonl.gz"
    rng = random.Random(2)
    zipped.write_bytes(gzip.compress(bytes(rng.getrandbits(8) for _ in range(70000)), 0))
    wide = tmp_path / "wide.parquet"
    parquet_file(wide, 300, 300)
    cases = [
        (big_text, f"error: text file '{big_text}' is 97.7 KiB, more than "
         "data.task_memory_bytes=65536 (64.0 KiB): a text file is one document, which one task "
         "holds whole; split it into smaller files or raise data.task_memory_bytes"),
        (zipped, f"error: gzip file '{zipped}' is 68.4 KiB, more than data.task_memory_bytes="
         "65536 (64.0 KiB): a compressed file cannot be cut into ranges, one task would read it "
         "whole; decompress it or split it into smaller files or raise data.task_memory_bytes"),
        (wide, f"error: parquet file '{wide}' row group 0 is "),
    ]  # fmt: skip
    for path, expected in cases:
        before = tree_digest(tmp_path)
        rc = prep.main(["data=parquet", f"data.sources=[{path}]", f"data.out_dir={tmp_path / 'o'}",
                        f"data.task_memory_bytes={budget}"])  # fmt: skip
        line = one_error(capsys)
        assert rc == 2 and line.startswith(expected), line
        assert tree_digest(tmp_path) == before
    # the same row group under a budget that holds it is fine
    meta = pq.ParquetFile(wide).metadata
    assert meta.row_group(0).total_byte_size > budget
    cfg = DataConfig(sources=[str(wide)], task_memory_bytes=meta.row_group(0).total_byte_size)
    assert len(plan_units(cfg, 1 << 20).units) == 1


def test_a_small_compressed_jsonl_file_is_read_whole(tmp_path: Path) -> None:
    data, expected = jsonl_bytes(random.Random(3), 30)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(data))
    [unit] = list_work_units(DataConfig(sources=[str(tmp_path)]))
    assert (unit.format, unit.compression) == ("jsonl", "gzip")
    [unit] = plan_units(DataConfig(sources=[str(tmp_path)]), 16).units  # never cut
    assert [(d.id, d.text) for d in read_documents(unit)] == [
        (f"d.jsonl.gz@{pos}", t) for pos, t in expected
    ]


# ---------------------------------------------------------------------------- tokenizer sample


def test_tokenizer_sample_is_bounded_and_seeded(tmp_path: Path) -> None:
    rng = random.Random(4)
    texts = {}
    for i in range(40):
        texts[f"f{i:02d}.txt"] = "".join(rng.choice("abc \n") for _ in range(1000))
        (tmp_path / f"f{i:02d}.txt").write_text(texts[f"f{i:02d}.txt"])
    units = plan_units(DataConfig(sources=[str(tmp_path)]), 1 << 20).units
    whole = [t for n, t in sorted(texts.items()) if split_of(n, 0.05, 1234) == "train"]
    fits = DataConfig(sources=[str(tmp_path)], tokenizer_sample_bytes=40_000)
    assert list(prep.train_texts(units, fits)) == whole  # all of it, in listing order
    small = DataConfig(sources=[str(tmp_path)], tokenizer_sample_bytes=10_500)
    sample = list(prep.train_texts(units, small))
    assert sum(len(t) for t in sample) <= 10_500 and len(sample) == 10
    assert set(sample) <= set(whole) and sample != whole[:10]
    assert list(prep.train_texts(units, small)) == sample  # seeded: the same sample again
    other = list(prep.train_texts(units, replace(small, seed=7)))
    assert other != sample


# ---------------------------------------------------------------------------- manifest, ledger


def test_manifest_is_deterministic_and_reads_version_1(tmp_path: Path, inline: None) -> None:
    (tmp_path / "src").mkdir()
    for i in range(6):
        (tmp_path / "src" / f"d{i}.txt").write_text(f"document {i} " * 200)
    cfg = DataConfig(sources=[str(tmp_path / "src")], seq_len=16, vocab_size=300,
                     val_fraction=0.3, out_dir=str(tmp_path / "a"))  # fmt: skip
    a = prep.prepare(cfg)
    b = prep.prepare(replace(cfg, out_dir=str(tmp_path / "b")))
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (
        tmp_path / "b" / "manifest.json"
    ).read_bytes()
    assert a.cache_key == b.cache_key and "created" not in json.loads(
        (tmp_path / "a" / "manifest.json").read_text()
    )
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if not p.suffix == ".parquet") == [
        "manifest.json", "tokenizer.json"
    ]  # fmt: skip
    # a shard's content changes: so does the cache key
    d = a.to_dict()
    d["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    changed = Manifest.from_dict(d)
    assert changed.cache_key != a.cache_key
    # a version-1 manifest (created, no shard digests) is still read
    v1 = a.to_dict()
    v1["version"] = 1
    v1["created"] = "2024-01-01T00:00:00+00:00"
    for split in v1["splits"].values():
        for shard in split["shards"]:
            del shard["sha256"]
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "manifest.json").write_text(json.dumps(v1))
    old = read_manifest(tmp_path / "v1")
    assert old.created == "2024-01-01T00:00:00+00:00" and old.cache_key != a.cache_key
    # datasets prepared before the scale settings existed keep their settings
    assert "task_memory_bytes" not in prep.settings_of(DataConfig())
    assert prep.settings_of(replace(cfg, task_memory_bytes=1 << 20))["task_memory_bytes"] == 1 << 20


def test_one_task_runs_in_this_process_unless_a_cluster_is_named(
    tmp_path: Path, no_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "src").mkdir()
    for i in range(4):
        (tmp_path / "src" / f"d{i}.txt").write_text(f"document {i} " * 200)
    cfg = DataConfig(sources=[str(tmp_path / "src")], seq_len=16, vocab_size=300,
                     val_fraction=0.3, num_tasks=1, out_dir=str(tmp_path / "one"))  # fmt: skip
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    manifest = prep.prepare(cfg)  # no_ray: ray.init raises
    assert manifest.stats["num_tasks"] == 1 and manifest.splits["train"].num_samples > 0
    with pytest.raises(AssertionError, match="Ray would start"):  # two tasks
        prep.prepare(replace(cfg, num_tasks=2, out_dir=str(tmp_path / "two")))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(AssertionError, match="Ray would start"):  # a cluster named
        prep.prepare(replace(cfg, out_dir=str(tmp_path / "named")))


def test_a_ledger_of_other_settings_is_refused(tmp_path: Path, no_ray: None, capsys) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello " * 100)
    out = tmp_path / "data"
    base = ["data=parquet", f"data.sources=[{tmp_path / 'src'}]", f"data.out_dir={out}"]
    theirs = prep.load_data_config([*base, "data.seq_len=64"])
    build = Path(prep.partial_dir(str(out), prep.settings_of(theirs)))
    prep.Ledger(str(build)).write_plan({"settings": prep.settings_of(theirs), "tasks": []})
    before = tree_digest(tmp_path)
    assert prep.main([*base, "data.seq_len=32"]) == 2
    line = one_error(capsys)
    assert line == (
        f"error: data.out_dir: '{build}' holds the ledger of an unfinished prepare with other "
        "settings (changed: seq_len); finish it by running that prepare again, pick another "
        "data.out_dir, or pass overwrite (--overwrite) to discard it"
    )
    assert tree_digest(tmp_path) == before
    # its own ledger is not in the way, and --overwrite passes the check
    assert prep.check_out_dir(theirs) is None
    cfg = prep.load_data_config([*base, "data.seq_len=32"])
    assert prep._check_out_dir(str(out), prep.settings_of(cfg), True) is None


def test_scale_settings_are_validated() -> None:
    with pytest.raises(DataError, match="data.task_memory_bytes: must be >= 65536, got 1000"):
        DataConfig(task_memory_bytes=1000)
    with pytest.raises(DataError, match="data.tokenizer_sample_bytes: must be >= 1, got 0"):
        DataConfig(tokenizer_sample_bytes=0)
