"""Sources, tokenizer, manifest and prepare()'s checks: tiny corpora in tmp_path, in-process (the
prepare runs, which start Ray tasks, are in tests/e2e/test_data_e2e.py; here the `inline`
fixture runs prepare's tasks in this process)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import data_pipeline.prepare as prepare_mod
import data_pipeline.sources as sources
from data_pipeline import storage
from data_pipeline.config import EOS_TOKEN, DataConfig, DataError
from data_pipeline.manifest import (
    MANIFEST_VERSION,
    Manifest,
    ShardInfo,
    SplitInfo,
    TokenizerInfo,
    read_manifest,
)
from data_pipeline.prepare import prepare
from data_pipeline.sources import (
    list_work_units,
    plan_units,
    read_documents,
    split_of,
    stdlib_root,
)
from data_pipeline.tokenizer import eos_id, load_tokenizer, train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi rho".split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(
        rng.choice(WORDS) + rng.choice(["", ",", ".\n", "()", " = 1"]) for _ in range(n)
    )


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


# ---------------------------------------------------------------------------- config, sources


def test_config_validation() -> None:
    for kwargs, pattern in [
        ({"seq_len": 0}, "data.seq_len: must be >= 1, got 0"),
        ({"val_fraction": 1.0}, r"data.val_fraction: must be in \[0, 1\), got 1.0"),
        ({"format": "csv"}, "data.format: 'csv' is not one of"),
        ({"vocab_size": 100}, "data.vocab_size: must be >= 257, got 100"),
        ({"samples_per_shard": 0}, "data.samples_per_shard"),
        ({"sources": "/x/y"}, r"data.sources: must be a list of paths.*\[/x/y\]"),
    ]:
        with pytest.raises(DataError, match=pattern):
            DataConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="unknown key"):
        DataConfig.from_dict({"seq_len": 8, "bogus": 1})
    assert DataConfig.from_dict({"sources": None, "seq_len": 8}).sources == []


def test_stdlib_listing_excludes_tests() -> None:
    units = list_work_units(DataConfig())
    assert len(units) > 500
    root = Path(stdlib_root())
    for unit in units:
        rel = Path(unit.path).relative_to(root)
        assert unit.name == rel.as_posix() and unit.format == "text" and rel.suffix == ".py"
        assert not any(p.startswith("test") or p.endswith("_test") for p in rel.parts[:-1])
        assert "site-packages" not in rel.parts
    assert [u.path for u in units] == sorted(u.path for u in units)
    assert any(u.name == "json/decoder.py" for u in units)


def test_user_sources_listing_and_documents(corpus: tuple[list[str], list]) -> None:
    srcs, docs = corpus
    cfg = DataConfig(sources=srcs)
    units = list_work_units(cfg)
    assert [u.format for u in units] == ["text"] * 9 + ["jsonl", "parquet"]  # 8 docs + empty.txt
    assert units[-2].path.startswith("file://")
    got = [(d.id, d.text) for u in units for d in read_documents(u, cfg.text_column)]
    assert got == docs
    # max_documents from metadata: the 9 text files count (empty.txt too: only reading tells
    # that it is blank), the JSONL file takes the 1 left, the Parquet file is not reached
    capped = DataConfig(sources=srcs, max_documents=10)
    assert [d.id for d in sources.iter_documents(capped)] == [d[0] for d in docs[:9]]
    listing = plan_units(capped, 1 << 20)
    assert [u.format for u in listing.units] == ["text"] * 9 + ["jsonl"]
    assert listing.units[-1].limit == 1
    capped = DataConfig(sources=[srcs[2], srcs[0]], max_documents=10)  # Parquet rows count
    assert [u.stop for u in plan_units(capped, 1 << 20).units] == [10]
    assert len(list(sources.iter_documents(DataConfig(sources=srcs[2:], max_documents=5)))) == 4


def test_big_files_are_cut_into_ranges(corpus: tuple[list[str], list]) -> None:
    srcs, docs = corpus
    listing = plan_units(DataConfig(sources=srcs[1:]), 1500)
    jsonl = [u for u in listing.units if u.format == "jsonl"]
    assert len(jsonl) > 3 and len({u.path for u in listing.units}) == 2
    assert [u.start for u in jsonl] == list(range(0, 1500 * len(jsonl), 1500))
    assert [d.id for u in listing.units for d in read_documents(u)] == [d[0] for d in docs[8:]]


@pytest.fixture
def inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare() without Ray: its tasks run here, one after another (same function, same
    results: the tasks are independent)."""
    import ray

    def run_inline(tasks, fn_kwargs, env=None):
        return {k: prepare_mod.tokenize_task(k, units, **fn_kwargs) for k, units in tasks.items()}

    monkeypatch.setattr(prepare_mod, "_run_tasks", run_inline)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # "running": prepare starts none


def test_an_empty_hashed_val_split_is_refused_with_the_remedy(tmp_path: Path, inline) -> None:
    """The listing reads no document, so the hold-out cannot be corrected afterwards (the old
    fallback moved one document to val): an empty split is one line naming the remedies."""
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text(f"file {i} " * 50)
    assert all(split_of(f"f{i}.txt", 0.01, 1234) == "train" for i in range(3))
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare(DataConfig(sources=[str(tmp_path)], val_fraction=0.01, seq_len=8,
                           vocab_size=300, out_dir=str(out)))  # fmt: skip
    assert str(err.value).startswith(
        "val split has 0 documents: the hashed hold-out of data.val_fraction=0.01 "
        "(data.seed=1234) put 0 of the 3 documents in val; name a validation set with "
        "data.val_sources=[...] or data.split_column"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0.txt", "f1.txt", "f2.txt"]
    manifest = prepare(DataConfig(sources=[str(tmp_path)], val_fraction=0.0, seq_len=8,
                                  vocab_size=300, out_dir=str(out)))  # fmt: skip
    assert manifest.num_documents == {"train": 3, "val": 0}


def test_bad_inputs_raise_data_error(tmp_path: Path, inline) -> None:
    out = str(tmp_path / "out")
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError, match=f"data.sources: path '{missing}' does not exist"):
        prepare(DataConfig(sources=[missing], out_dir=out))
    bad_parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), bad_parquet)
    with pytest.raises(DataError) as err:
        prepare(DataConfig(sources=[str(bad_parquet)], out_dir=out))
    assert str(err.value) == (
        f"parquet file '{bad_parquet}' has no column 'text' (columns: id, body)"
    )
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.md").write_text(" \n\t")
    with pytest.raises(DataError) as err:
        prepare(DataConfig(sources=[str(empty)], out_dir=out))
    assert str(err.value) == (
        f"data.sources matched no documents (after dropping empty ones): ['{empty}']"
    )
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"line 2 has no field 'text' \(fields: body\)"):
        prepare(DataConfig(sources=[str(bad_jsonl)], out_dir=out))
    with pytest.raises(DataError, match="matched no files"):
        prepare(DataConfig(sources=[str(tmp_path / "*.csv")], out_dir=out))
    not_ours = tmp_path / "not_ours"
    not_ours.mkdir()
    (not_ours / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="exists and is not a prepared dataset"):
        prepare(DataConfig(sources=[str(bad_jsonl)], out_dir=str(not_ours)))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- out_dir, manifest


def small_manifest() -> Manifest:
    return Manifest(
        version=MANIFEST_VERSION,
        name="tiny",
        tokenizer=TokenizerInfo(file="v-0123456789abcdef/tokenizer.json", sha256="0" * 64,
                                vocab_size=300, eos_id=0),
        seq_len=4,
        splits={
            "train": SplitInfo(shards=[ShardInfo("v-0123456789abcdef/train-00000-000.parquet", 3)],
                               num_samples=3, num_tokens=15),
            "val": SplitInfo(),
        },
        sources=["x"],
        num_documents={"train": 2, "val": 0},
        settings={"seq_len": 4},
        fingerprint="f" * 64,
        created="2024-01-01T00:00:00+00:00",
    )  # fmt: skip


def test_manifest_shards_are_a_column_table_that_round_trips() -> None:
    shards = [
        {"file": "train-00000-000.parquet", "rows": 3, "sha256": "a" * 64},
        {"file": "train-00001-000.parquet", "rows": 5},  # version 1: no digest
    ]
    d = small_manifest().to_dict()
    d["splits"]["train"].update(shards=shards, num_samples=8, num_tokens=40)
    m = Manifest.from_dict(d)
    table = m.splits["train"].shards
    assert m.to_dict() == d and m.to_dict() is not d
    assert table.files == ["train-00000-000.parquet", "train-00001-000.parquet"]
    assert table.rows.tolist() == [3, 5] and len(table) == 2
    assert list(table) == [
        ShardInfo(shards[0]["file"], 3, "a" * 64),
        ShardInfo(shards[1]["file"], 5),
    ]
    assert table[-1] == ShardInfo("train-00001-000.parquet", 5) and table[1:] == [table[1]]
    assert m.files() == [m.tokenizer.file, *table.files]
    with pytest.raises(AttributeError):  # read-only: a changed manifest is made from a dict
        table[0].rows = 4
    d["splits"]["train"]["shards"][1]["rows"] = "five"
    with pytest.raises(TypeError, match="rows is not an integer"):
        Manifest.from_dict(d)


def test_one_manifest_reader(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert read_manifest(out) is None and read_manifest(str(tmp_path / "a" / "b")) is None
    with pytest.raises(DataError, match=f"no manifest.json in '{out}'"):
        Manifest.load(out)
    manifest = small_manifest()
    assert manifest.save(str(out)) == f"{out}/manifest.json"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # no temp file left
    assert read_manifest(str(out)) == manifest == Manifest.load(f"file://{out}")
    assert manifest.files() == [
        "v-0123456789abcdef/tokenizer.json",
        "v-0123456789abcdef/train-00000-000.parquet",
    ]
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json' is not valid JSON"):
        read_manifest(out)
    (out / "manifest.json").write_text('{"version": 99}')
    with pytest.raises(DataError, match=f"has version 99, expected {MANIFEST_VERSION}"):
        Manifest.load(out)
    (out / "manifest.json").write_text('{"version": 1, "name": "x"}')
    with pytest.raises(DataError, match="is malformed"):
        read_manifest(out)


def no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_check_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_aws_credentials(monkeypatch, tmp_path)
    with pytest.raises(storage.StorageError, match=r"^run.root \(s3://b/x\): missing credentials"):
        storage.check_credentials("s3://b/x", "run.root")
    storage.check_credentials(str(tmp_path), "run.root")  # local: nothing to check
    storage.check_credentials("gs://b/x", "run.root")  # other clouds: their own chain
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    with pytest.raises(storage.StorageError, match="AWS_SECRET_ACCESS_KEY is not"):
        storage.check_credentials("s3://b/x", "run.root")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    storage.check_credentials("s3://b/x", "run.root")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    (tmp_path / "no-credentials").write_text("[default]\n")
    storage.check_credentials("s3://b/x", "run.root")  # a shared credentials file
    (tmp_path / "no-credentials").unlink()
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    storage.check_credentials("s3://b/x", "run.root")  # an instance role may provide them
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert storage.remote_env()["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"


def test_object_store_out_dir_is_never_a_local_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """s3:// out_dirs used to become a local folder named `s3:`; unusable storage is refused
    in one line before anything is read, written or started (no Ray, no network here)."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    no_aws_credentials(monkeypatch, tmp_path)
    sources = [str(tmp_path / "no-such-source")]
    with pytest.raises(DataError) as err:
        prepare(DataConfig(sources=sources, out_dir="s3://bucket/data"))
    assert str(err.value).startswith("data.out_dir (s3://bucket/data): missing credentials: ")
    with pytest.raises(DataError, match=r"data.out_dir \(ftp://host/x\): scheme 'ftp://' is not"):
        prepare(DataConfig(sources=sources, out_dir="ftp://host/x"))
    assert list(work.iterdir()) == []


# ---------------------------------------------------------------------------- tokenizer


def test_train_and_load_tokenizer(tmp_path: Path) -> None:
    rng = random.Random(1)
    texts = [words(rng, 200) for _ in range(20)] + ["héllo wörld ✓ 日本"]
    tok = train_tokenizer(texts, 300)
    assert train_tokenizer(texts, 300).to_str() == tok.to_str()  # deterministic
    assert 257 < tok.get_vocab_size() <= 300
    sample = "gamma delta = 1 ✓ 日本語 \t\n"
    assert tok.decode(tok.encode(sample).ids) == sample  # byte-level: lossless
    path = tmp_path / "tok.json"
    tok.save(str(path))
    assert eos_id(load_tokenizer(str(path))) == tok.token_to_id(EOS_TOKEN)
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    plain.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(DataError, match=r"no_eos.json' has no '<\|endoftext\|>' token"):
        load_tokenizer(str(tmp_path / "no_eos.json"))
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_the_built_in_corpus_leaves_generated_files_out(tmp_path):
    """Codec tables and other generated files say so in their first lines; the built-in
    corpus is Python that people wrote (the demo's sample then reads like Python)."""
    from data_pipeline.sources import list_stdlib_files

    (tmp_path / "encodings").mkdir()
    (tmp_path / "encodings" / "cp1252.py").write_text(
        '""" Python Character Mapping Codec cp1252 generated from \'CP1252.TXT\' '
        'with gencodec.py.\n"""\ndecoding_table = (\n    "\\x00"\n)\n'
    )
    (tmp_path / "token.py").write_text(
        '"""Token constants."""\n# Auto-generated by Tools/x.py\nA = 1\n'
    )
    (tmp_path / "ast.py").write_text('"""A tree can be generated by passing a flag."""\nx = 1\n')
    (tmp_path / "late.py").write_text("x = 1\n" * 200 + "# generated from nothing\n")
    assert [Path(p).name for p in list_stdlib_files(str(tmp_path))] == ["ast.py", "late.py"]

    real = [Path(p) for p in list_stdlib_files()]
    names = {p.name for p in real}
    assert {"ast.py", "idna.py", "os.py"} <= names and not {"cp1252.py", "keyword.py"} & names
    assert not any("Character Mapping Codec" in p.read_text()[:600] for p in real)
