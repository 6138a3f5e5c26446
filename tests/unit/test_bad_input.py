"""Every bad input stopped at the edge (issue 13), by category, in this process.

Each category has one test parametrized over its cases. A case goes through the command's own
main() (`python -m data_pipeline.prepare`, `python -m trainer.train` for a new run and for a
resume, `python -m trainer.export`, a sweep's `--check -m`) or, where main() would only add the
same 0.6 s of Hydra composition again, through the validation function that owns the rule.
Either way it asserts: exit status 2 (or the error type the edge turns into it), exactly one
`error:` line naming the value and the rule, and nothing created or changed (the tree digest
of the workspace, which holds an earlier run to resume, is the same before and after). No case
reaches Ray: `connected` and `ray.init` refuse to run here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import DataError
from data_pipeline.manifest import Manifest, ShardInfo, SplitInfo, TokenizerInfo
from trainer.config import ConfigError, load_config

_spec = importlib.util.spec_from_file_location(
    "cli_helpers", Path(__file__).resolve().parents[1] / "e2e" / "cli_helpers.py"
)
cli_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_helpers)
tree_digest = cli_helpers.tree_digest

# fp32: bf16 on this CPU adds its own warning line (trainer/driver/preflight.py).
SMOKE = ["+experiment=smoke", "precision=fp32"]


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace: an earlier run `old` under runs/ (what a resume must leave alone) and a
    plain file to put paths under."""
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (tmp_path / "afile").write_text("x")
    return tmp_path


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """A bad input that got past the edge would start Ray: fail the test instead."""
    import ray

    import cluster.launch

    def refuse(*args, **kwargs):
        raise AssertionError("Ray would start: the bad input was not stopped at the edge")

    monkeypatch.setattr(cluster.launch, "connected", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def train_args(ws: Path, name: str | None = "old") -> list[str]:
    """A resume of the run `old` (or a new run `name`; None: the command line names it) with
    the data in ws/data."""
    args = [*SMOKE, f"run.root={ws / 'runs'}", f"data.out_dir={ws / 'data'}"]
    return args + ([f"run.name={name}"] if name else [])


def one_error(capsys) -> str:
    """The single `error:` line of what the command printed (and no traceback)."""
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    return errors[0]


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def train_main(argv: list[str]) -> int:
    from trainer.train import main

    return main(argv)


def prepare_main(argv: list[str]) -> int:
    from data_pipeline.prepare import main

    return main(argv)


def export_main(argv: list[str]) -> int:
    from trainer.export import main

    return main(argv)


@pytest.fixture(scope="module")
def base_cfg():
    """One composed config (0.6 s) that direct rule checks vary with dataclasses.replace."""
    return load_config([*SMOKE, "run.name=r"])


def with_paths(cfg, ws: Path, **changes):
    run = dataclasses.replace(cfg.run, root=changes.pop("root", str(ws / "runs")))
    data = dataclasses.replace(cfg.data, out_dir=changes.pop("out_dir", str(ws / "data")))
    parallel = cfg.parallel
    if "nvme_path" in changes:
        parallel = dataclasses.replace(
            cfg.parallel,
            zero_stage=3,
            offload_optimizer=True,
            offload_device="nvme",
            nvme_path=changes.pop("nvme_path"),
        )
    assert not changes
    return dataclasses.replace(cfg, run=run, data=data, parallel=parallel)


def fake_manifest(out_dir: Path, data_cfg, *, val_samples: int, **settings) -> None:
    """A prepared dataset's manifest (no shards): what preflight reads of out_dir."""
    from data_pipeline.prepare import settings_of

    Manifest(
        version=1,
        name="smoke",
        tokenizer=TokenizerInfo("tokenizer.json", "0" * 64, 512, 0),
        seq_len=data_cfg.seq_len,
        splits={
            "train": SplitInfo([ShardInfo("train-00000-000.parquet", 100)], 100, 6500, 0),
            "val": SplitInfo([ShardInfo("val-00000-000.parquet", val_samples)], val_samples),
        },
        sources=[],
        num_documents={"train": 10, "val": 1},
        settings={**settings_of(data_cfg), **settings},
        fingerprint="f",
        created="2026-01-01T00:00:00+00:00",
    ).save(str(out_dir))


# ---------------------------------------------------------------------------- damaged input


def _write_damaged(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    good = d / "good.parquet"
    pq.write_table(pa.table({"text": ["def f():\n    return 1\n" * 20] * 30}), good)
    files = {
        "not-parquet": d / "notes.parquet",
        "truncated": d / "cut.parquet",
        "damaged-pages": d / "pages.parquet",
        "damaged-manifest": d / "prepared" / "manifest.json",
        "jsonl-array": d / "array.jsonl",
        "jsonl-number": d / "number.jsonl",
        "jsonl-string": d / "string.jsonl",
    }
    files["not-parquet"].write_text("id,text\n1,hello\n")
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pages = d / "zstd.parquet"  # a valid footer in front of which the data pages are damaged
    texts = [f"document number {i} " * 200 for i in range(300)]
    pq.write_table(pa.table({"text": texts}), pages, compression="zstd")
    damaged = bytearray(pages.read_bytes())
    for i in range(100, len(damaged) // 2, 7):
        damaged[i] ^= 0x5A
    files["damaged-pages"].write_bytes(bytes(damaged))
    pages.unlink()
    files["damaged-manifest"].parent.mkdir()
    files["damaged-manifest"].write_text('{"version": 1,\n "name": ')
    files["jsonl-array"].write_text('{"text": "a"}\n["a", "b"]\n')
    files["jsonl-number"].write_text('{"text": "a"}\n{"text": "b"}\n42\n')
    files["jsonl-string"].write_text('"just text"\n')
    good.unlink()
    return files


DAMAGED = [
    ("not-parquet", r"cannot be read as Parquet: Parquet magic bytes not found"),
    ("truncated", r"cannot be read as Parquet: Parquet magic bytes not found"),
    ("damaged-pages", r"cannot be read as Parquet: ZSTD decompression failed"),
    ("damaged-manifest", r"is not valid JSON \(Expecting value: line 2 column 10"),
    ("jsonl-array", r"line 2: is a JSON array, not an object"),
    ("jsonl-number", r"line 3: is a JSON number, not an object"),
    ("jsonl-string", r"line 1: is a JSON string, not an object"),
]


# Found by reading documents, which prepare's tasks do (the driver lists from metadata only):
# these cases run the tasks in this process instead of on Ray.
READ_BY_TASKS = ("damaged-pages", "jsonl-array", "jsonl-number", "jsonl-string")


def inline_tasks(monkeypatch) -> None:
    """prepare's Ray tasks run here, one after another (the same function)."""
    import ray

    import data_pipeline.prepare as prep

    def run_inline(tasks, fn_kwargs, env=None):
        return {k: prep.tokenize_task(k, units, **fn_kwargs) for k, units in tasks.items()}

    monkeypatch.setattr(prep, "_run_tasks", run_inline)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)


@pytest.mark.parametrize("kind,what", DAMAGED, ids=[k for k, _ in DAMAGED])
def test_damaged_input_files_are_named_with_what_is_wrong(ws, capsys, monkeypatch, kind, what):
    """prepare names the file (and line, or row group) and what is wrong; nothing is left.
    Its listing reads Parquet footers before Ray starts, and so does training's preflight;
    damaged pages and JSONL lines are found by prepare's tasks (run in-process here)."""
    import re

    if kind in READ_BY_TASKS:
        inline_tasks(monkeypatch)
    path = _write_damaged(ws / "src")[kind]
    before = tree_digest(ws)
    if kind == "damaged-manifest":  # a prepared dataset's: prepare, and a resume, name it
        data = [*SMOKE, f"data.out_dir={path.parent}"]
        rc = train_main([*train_args(ws), f"data.out_dir={path.parent}"])
        line = one_error(capsys)
        assert rc == 2 and f"'{path}'" in line and re.search(what, line), line
    else:
        data = [f"data.sources=[{path}]", f"data.out_dir={ws / 'data'}"]
    rc = prepare_main(data)
    line = one_error(capsys)
    assert rc == 2
    assert f"'{path}'" in line and re.search(what, line), line
    assert tree_digest(ws) == before and not (ws / "data").exists()
    if kind.endswith(("parquet", "truncated")):  # training: the same line, before Ray
        rc = train_main([*train_args(ws), f"data.sources=[{path}]"])
        line = one_error(capsys)
        assert rc == 2 and f"'{path}'" in line and re.search(what, line), line
        assert tree_digest(ws) == before


def test_data_that_cannot_serve_the_run_stops_a_multi_worker_run_before_ray(
    ws, capsys, monkeypatch
):
    """A 2-worker run (Ray's path): a Parquet source without the text column, a source without
    documents (found by reading them: its one prepare task runs before Ray), and prepared data
    whose tokenizer is larger than model.vocab_size, are one line before Ray starts (no_ray
    refuses it), with nothing written."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    src = ws / "src"
    src.mkdir()
    pq.write_table(pa.table({"body": ["def f():\n    return 1\n"] * 30}), src / "body.parquet")
    before = tree_digest(ws)
    run = [*train_args(ws, "new"), "cluster.num_workers=2", "data=parquet"]
    rc = train_main([*run, f"data.sources=[{src / 'body.parquet'}]", "data.vocab_size=512"])
    line = one_error(capsys)
    assert rc == 2 and f"'{src / 'body.parquet'}' has no column 'text'" in line, line
    assert tree_digest(ws) == before
    (src / "blank.txt").write_text("  \n")
    before = tree_digest(ws)
    rc = train_main(
        [*train_args(ws, "new"), "cluster.num_workers=2", f"data.sources=[{src}/*.txt]"]
    )
    line = one_error(capsys)
    assert rc == 2 and "no documents" in line, line
    assert tree_digest(ws) == before
    # prepared data (one prepare task: in this process) that the model cannot embed
    assert prepare_main([*SMOKE, f"data.out_dir={ws / 'data'}"]) == 0
    capsys.readouterr()
    before = tree_digest(ws)
    rc = train_main([*train_args(ws, "new"), "cluster.num_workers=2", "model.vocab_size=256"])
    line = one_error(capsys)
    assert rc == 2 and "model.vocab_size (256) is smaller than the tokenizer's vocab" in line
    assert tree_digest(ws) == before


# ---------------------------------------------------------------------------- locations


LOCATIONS = [
    # (setting, the path relative to the workspace, which command's edge)
    ("run.root", "afile", "preflight"),
    ("run.root", "afile/runs", "preflight"),
    ("data.out_dir", "afile/data", "preflight"),
    ("parallel.nvme_path", "afile", "preflight"),
    ("parallel.nvme_path", "afile/offload", "preflight"),
    ("run.root", "afile/runs", "train"),
    ("data.out_dir", "afile/data", "prepare"),
    ("export target", "afile", "export"),
    ("export target", "afile/model", "export"),
]


@pytest.mark.parametrize(
    "setting,where,edge", LOCATIONS, ids=[f"{e}-{s}-{w}" for s, w, e in LOCATIONS]
)
def test_output_locations_that_cannot_be_written_are_refused_up_front(
    ws, capsys, base_cfg, setting, where, edge
):
    from trainer.driver import preflight

    target = str(ws / where)
    before = tree_digest(ws)
    if edge == "preflight":
        key = {"run.root": "root", "data.out_dir": "out_dir"}.get(setting, "nvme_path")
        cfg = with_paths(base_cfg, ws, **{key: target})
        with pytest.raises(ConfigError) as e:
            preflight.check_storage(cfg)
            preflight.check_offload(cfg)
        line = one_line(e)
    else:
        if edge == "train":
            rc = train_main([*train_args(ws), f"run.root={target}"])
        elif edge == "prepare":
            rc = prepare_main([f"data.out_dir={target}"])
        else:  # the checkpoint does not exist either: the target is checked first
            rc = export_main([str(ws / "runs" / "nope"), target])
        line = one_error(capsys)
        assert rc == 2
    assert line.removeprefix("error: ").startswith(f"{setting} ({target}): "), line
    assert "exists and is not a directory" in line, line
    assert tree_digest(ws) == before


def test_an_export_target_that_is_not_empty_is_refused_before_reading(ws, capsys):
    (ws / "model").mkdir()
    (ws / "model" / "mine.txt").write_text("keep")
    before = tree_digest(ws)
    assert export_main([str(ws / "runs" / "nope"), str(ws / "model")]) == 2
    line = one_error(capsys)
    assert f"export target ({ws / 'model'}) exists and is not empty" in line
    assert tree_digest(ws) == before


# ---------------------------------------------------------------------------- names


ESCAPING = ["..", ".", "../elsewhere", "a/b", "/tmp/abs", ".hidden", "-flag", "a b", ""]


@pytest.mark.parametrize("value", ESCAPING, ids=[repr(v) for v in ESCAPING])
def test_names_that_could_leave_their_directory_are_refused(value):
    """The rule, for every name that becomes a directory or a file of conf/."""
    from trainer.config import RunConfig, SweepConfig, check_group_options

    for build, key in (
        (lambda v: RunConfig(name=v), "name"),
        (lambda v: RunConfig(group=v), "group"),
        (lambda v: SweepConfig(name=v), "name"),
    ):
        with pytest.raises(ValueError) as e:
            build(value)
        assert one_line(e).startswith(f"{key} ({value!r}) must be letters, digits, '.', '_'")
    if value:
        for override in (f"model={value}", f"+experiment={value}", f"data=gpt,{value}"):
            with pytest.raises(ConfigError) as e:
                check_group_options([override])
            assert f"({value!r}) must be letters" in one_line(e)
    for fine in ("gpt2-124m", "run_1.5", "sweep-3cd1ce06"):
        RunConfig(name=fine, group=fine)
        SweepConfig(name=fine)


NAME_CASES = [
    ("train", ["run.name=../escaped"], "run: name ('../escaped')"),
    ("train", ["run.group=../g"], "run: group ('../g')"),
    ("train", ["model=../experiment/smoke"], "model ('../experiment/smoke')"),
    ("sweep", ["sweep.name=..", "optim.lr=1e-3,3e-4"], "sweep: name ('..')"),
    ("sweep", ["model=gpt-tiny,../experiment/smoke"], "model ('../experiment/smoke')"),
    ("prepare", ["data=../model/gpt-tiny"], "data ('../model/gpt-tiny')"),
]


@pytest.mark.parametrize(
    "edge,overrides,named", NAME_CASES, ids=[f"{c[0]}-{c[1][0]}" for c in NAME_CASES]
)
def test_escaping_names_are_one_line_at_every_command(ws, capsys, edge, overrides, named):
    before = tree_digest(ws)
    if edge == "prepare":
        rc = prepare_main([*overrides, f"data.out_dir={ws / 'data'}"])
    elif edge == "sweep":
        rc = train_main(["--check", "-m", *SMOKE, f"run.root={ws / 'runs'}", *overrides])
    else:
        named_run = any(o.startswith("run.name=") for o in overrides)
        rc = train_main([*train_args(ws, name=None if named_run else "new"), *overrides])
    line = one_error(capsys)
    assert rc == 2 and named in line and "must be letters, digits" in line, line
    assert tree_digest(ws) == before and not (ws / "escaped").exists()


# ---------------------------------------------------------------------------- layouts

# The issue-22 layouts that cannot run: each names its values and rule, from `python -m
# trainer.train` of a new run, before Ray (a resume at another tensor-parallel size:
# tests/unit/test_resume_policy.py, the driver's plan).
W4 = ["cluster.num_workers=4", "cluster.cpus_per_worker=0.5"]
LAYOUTS = [
    (
        ["parallel.sequence_parallel=2", "model.n_head=2", "model.n_kv_head=1"],
        "model n_kv_head (1) is not divisible by sequence_parallel (2)",
    ),
    (
        [*W4, "parallel=pp2", "parallel.sequence_parallel=2"],
        "sequence_parallel (2) with pipeline_parallel (2) is not supported",
    ),
    (
        ["parallel=3d", "cluster.num_workers=6", "cluster.cpus_per_worker=0.25"],
        "cluster.num_workers (6) is not divisible by tensor_parallel (2) x pipeline_parallel (2)"
        " x sequence_parallel (1) = 4",
    ),
    (
        ["parallel.sequence_parallel=2", "data.seq_len=63"],
        "data.seq_len (63) is not divisible by sequence_parallel (2)",
    ),
]


@pytest.mark.parametrize("overrides,message", LAYOUTS, ids=[" ".join(c[0]) for c in LAYOUTS])
def test_layouts_that_cannot_run_are_one_line_before_ray(ws, capsys, overrides, message):
    before = tree_digest(ws)
    rc = train_main([*train_args(ws, name="new"), *overrides])
    line = one_error(capsys)
    assert rc == 2 and message in line, line
    assert tree_digest(ws) == before


# ---------------------------------------------------------------------------- never in effect


WARNED = [
    ({"optim.warmup_steps": 50}, "optim.warmup_steps (50) is longer than the run"),
    ({"trainer.eval_interval": 21}, "trainer.eval_interval (21) > max_steps: only the final"),
    ({"trainer.checkpoint_interval": 100}, "trainer.checkpoint_interval (100) > max_steps"),
    ({"logging.log_interval": 40}, "logging.log_interval (40) > max_steps"),
    ({"trainer.keep_every": 3}, "trainer.keep_every (3) x checkpoint_interval (10) > max_steps"),
]


@pytest.mark.parametrize("change,message", WARNED, ids=[next(iter(c)) for c, _ in WARNED])
def test_settings_a_short_run_can_mean_are_one_warning_line(base_cfg, change, message):
    """A short trial of a long config (max_steps 20 here) means these; they are one line of
    warning, not refused (trainer/config.py config_warnings says why per setting)."""
    from trainer.config import config_warnings

    assert config_warnings(base_cfg) == []  # the smoke config itself fits its 20 steps
    ((key, value),) = change.items()
    group, field = key.split(".")
    cfg = dataclasses.replace(
        base_cfg, **{group: dataclasses.replace(getattr(base_cfg, group), **{field: value})}
    )
    lines = config_warnings(cfg)
    assert len(lines) == 1 and lines[0].startswith("warning: trainer.max_steps is 20: ")
    assert message in lines[0], lines[0]


EVAL = [
    # (eval_batches, validation samples, the remedy)
    (3, 20, "set trainer.eval_batches <= 2"),
    (2, 5, "give more validation data"),
    (1, 0, "give more validation data"),  # data.val_fraction=0 and no val_sources
]


@pytest.mark.parametrize("batches,val,remedy", EVAL, ids=[f"{b}x{v}" for b, v, _ in EVAL])
def test_eval_batches_beyond_the_validation_split_are_refused(base_cfg, batches, val, remedy):
    from trainer.config import check_eval_fits

    t = dataclasses.replace(base_cfg.trainer, eval_batches=batches)
    with pytest.raises(ConfigError) as e:
        check_eval_fits(dataclasses.replace(base_cfg, trainer=t), val, "data/x")
    line = one_line(e)
    assert f"trainer.eval_batches ({batches}) x micro_batch_size (4) x data-parallel size" in line
    assert f"validation split of data/x holds {val}" in line and remedy in line
    check_eval_fits(base_cfg, 2 * 4 * base_cfg.dp_size, "data/x")  # exactly enough: fine


def test_an_eval_of_no_batches_is_refused():
    """The final eval always runs: eval_batches=0 used to reach the workers as an empty
    validation loader (a ValueError in every worker, after Ray started)."""
    from trainer.config import TrainerConfig

    with pytest.raises(ValueError) as e:
        TrainerConfig(eval_batches=0)
    assert one_line(e).startswith("eval_batches (0) must be >= 1: the final eval always runs")


def test_a_resume_with_an_eval_larger_than_the_prepared_val_split_changes_nothing(
    ws, capsys, base_cfg
):
    """Through `python -m trainer.train`: the warning line (max_steps 2 < warmup 5) and one
    error line from preflight, before Ray; the run and the dataset are as they were."""
    (ws / "data").mkdir()
    fake_manifest(ws / "data", base_cfg.data, val_samples=8)
    before = tree_digest(ws)
    rc = train_main([*train_args(ws), "trainer.max_steps=2", "trainer.eval_batches=2"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "warning:"))]
    assert rc == 2 and len(lines) == 2, err
    assert lines[0].startswith("warning: trainer.max_steps is 2: optim.warmup_steps (5)")
    assert lines[1].startswith("error: trainer.eval_batches (2) x micro_batch_size (4)")
    assert "holds 8" in lines[1] and "set trainer.eval_batches <= 1" in lines[1]
    assert tree_digest(ws) == before


# ---------------------------------------------------------------------------- wrong kind


def _tokenizer_files(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer_config.json": json.dumps({"tokenizer_class": "GPT2Tokenizer"}),
        "special_tokens_map.json": json.dumps({"eos_token": "<|endoftext|>"}),
        "vocab.json": json.dumps({"a": 0, "b": 1, "<|endoftext|>": 2}),
        "vocab.txt": "[PAD]\n[UNK]\nthe\n",
        "merges.txt": "#version: 0.2\nĠ t\n",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    (d / "hub-model").mkdir()
    return {name: d / name for name in [*files, "hub-model"]}


KINDS = [
    ("tokenizer_config.json", "is a tokenizer_config.json"),
    ("special_tokens_map.json", "is a special_tokens_map.json"),
    ("vocab.json", "is a vocab file"),
    ("vocab.txt", "is a vocab.txt file"),
    ("merges.txt", "is a merges.txt file"),
    ("hub-model", "is a directory"),
]


@pytest.mark.parametrize("name,kind", KINDS, ids=[k for k, _ in KINDS])
def test_a_file_of_the_wrong_kind_as_data_tokenizer_says_what_is_expected(ws, name, kind):
    from data_pipeline.config import DataConfig
    from data_pipeline.tokenizer import load_tokenizer
    from trainer.driver.preflight import tokenizer_vocab_size

    path = _tokenizer_files(ws / "hub")[name]
    before = tree_digest(ws)
    data = DataConfig(tokenizer=str(path), out_dir=str(ws / "data"))
    for call, error in ((load_tokenizer, DataError), (tokenizer_vocab_size, ConfigError)):
        with pytest.raises(error) as e:
            call(str(path) if call is load_tokenizer else data)
        line = one_line(e)
        assert line.startswith(f"data.tokenizer: '{path}' {kind}"), line
        assert "data.tokenizer expects a tokenizer.json" in line
    assert tree_digest(ws) == before


def _raygpt_run(d: Path) -> Path:
    ckpt = d / "checkpoint_000010"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 10}))
    return ckpt


MODEL_DIRS = [
    ("train", "run", "is a raygpt run directory, not a Hugging Face model directory"),
    ("train", "checkpoint", "is a raygpt checkpoint directory, not a Hugging Face model"),
    ("train", "file", "is a file (expected a Hugging Face model directory"),
    ("prepare", "tokenizer_config.json", "is a tokenizer_config.json"),
    ("export", "hf", "is a Hugging Face model directory (what export writes), not a raygpt run"),
]


@pytest.mark.parametrize("edge,given,kind", MODEL_DIRS, ids=[f"{e}-{g}" for e, g, _ in MODEL_DIRS])
def test_a_file_of_the_wrong_kind_is_one_line_at_every_command(ws, capsys, edge, given, kind):
    ckpt = _raygpt_run(ws / "runs" / "other")
    (ws / "hf").mkdir()
    (ws / "hf" / "config.json").write_text("{}")
    (ws / "hf" / "model.safetensors").write_bytes(b"")
    tok = _tokenizer_files(ws / "hub")["tokenizer_config.json"]
    path = {
        "run": ckpt.parent,
        "checkpoint": ckpt,
        "file": ws / "hf" / "model.safetensors",
        "tokenizer_config.json": tok,
        "hf": ws / "hf",
    }[given]
    before = tree_digest(ws)
    if edge == "train":
        rc = train_main([*train_args(ws), f"model.init_from={path}"])
    elif edge == "prepare":
        rc = prepare_main([f"data.tokenizer={path}", f"data.out_dir={ws / 'data'}"])
    else:
        rc = export_main([str(path), str(ws / "exported")])
    line = one_error(capsys)
    assert rc == 2 and str(path) in line and kind in line, line
    if given in ("run", "checkpoint"):  # the remedy is a command that exists
        assert f"`python -m trainer.export {path} OUT`" in line
    assert tree_digest(ws) == before


@pytest.mark.parametrize("holds", ["pytorch_model.bin", "nothing", "a shard short"])
def test_init_from_without_safetensors_weights_is_one_line_before_the_run_dir(ws, capsys, holds):
    """model.init_from a Hugging Face folder whose config fits but whose safetensors weights
    are not there: refused by preflight, exit 2, no run directory created (issue 23)."""
    import json as _json

    from models.hf import hf_config

    hf = ws / "hf"
    hf.mkdir()
    model = load_config(train_args(ws, "fresh")).model
    (hf / "config.json").write_text(_json.dumps(hf_config(model)))
    if holds == "pytorch_model.bin":
        (hf / "pytorch_model.bin").write_bytes(b"x")
    elif holds == "a shard short":
        index = {
            "weight_map": {
                "a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors",
            }
        }
        (hf / "model.safetensors.index.json").write_text(_json.dumps(index))
        (hf / "model-00001-of-00002.safetensors").write_bytes(b"x")
    before = tree_digest(ws)
    rc = train_main([*train_args(ws, "fresh"), f"model.init_from={hf}"])
    line = one_error(capsys)
    assert rc == 2 and str(hf) in line, line
    want = {
        "pytorch_model.bin": "it has only pytorch_model.bin; raygpt reads safetensors only",
        "nothing": "has no model.safetensors (or model.safetensors.index.json): it has no weights",
        "a shard short": "lists 1 shard(s) the directory lacks (first: model-00002-of-00002",
    }[holds]
    assert want in line, line
    assert not (ws / "runs" / "fresh").exists()
    assert tree_digest(ws) == before


# ---------------------------------------------------------------------------- remedies


def test_remedies_name_what_each_command_accepts(ws, capsys, base_cfg):
    """A data.out_dir holding another dataset: prepare says --overwrite (its flag); training,
    which has no such flag, names the prepare command instead, before Ray; neither changes
    anything."""
    out = ws / "data"
    out.mkdir()
    fake_manifest(out, base_cfg.data, val_samples=50, seq_len=32)
    before = tree_digest(ws)
    assert prepare_main([*SMOKE, f"data.out_dir={out}"]) == 2
    line = one_error(capsys)
    assert "holds a dataset prepared with other settings (changed: seq_len)" in line
    assert line.endswith("pass overwrite (--overwrite)")
    assert train_main(train_args(ws)) == 2
    line = one_error(capsys)
    assert "holds a dataset prepared with other settings (changed: seq_len)" in line
    assert "(--overwrite)" not in line
    assert "replace it with `python -m data_pipeline.prepare --overwrite`" in line
    assert train_main([*train_args(ws), "--overwrite"]) == 2  # what the old message suggested
    assert "--overwrite" in one_error(capsys)
    shutil.rmtree(out)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_digest(ws)
    assert train_main(train_args(ws)) == 2
    line = one_error(capsys)
    assert "exists and is not a prepared dataset" in line and "(--overwrite)" not in line
    assert tree_digest(ws) == before


USAGE = [
    (["r", "o", "--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    ([], "the following arguments are required: path, out_dir"),
    (["r", "o", "--overwrite"], "unrecognized arguments: --overwrite"),
]


@pytest.mark.parametrize("argv,message", USAGE, ids=["dtype", "missing", "flag"])
def test_export_usage_errors_are_one_line_with_the_usage(ws, capsys, argv, message):
    """argparse's two lines (usage, then `prog: error:`) are one `error:` line naming the
    value and the usage: the flags this command accepts."""
    before = tree_digest(ws)
    assert export_main([str(ws / a) if a in ("r", "o") else a for a in argv]) == 2
    line = one_error(capsys)
    assert message in line and "(usage: python -m trainer.export [-h] [--dtype" in line, line
    assert tree_digest(ws) == before and not (ws / "o").exists()


POSITIONS = ["yaml", "override", "init_from-json", "tokenizer-json"]


@pytest.mark.parametrize("case", POSITIONS)
def test_parse_errors_keep_their_position(ws, capsys, monkeypatch, case):
    import trainer.config
    from data_pipeline.tokenizer import load_tokenizer
    from trainer.init_from import check_hf_config

    before = tree_digest(ws)
    if case == "yaml":  # an edited conf/ file with a syntax error, via the command line
        conf = ws / "conf"
        shutil.copytree(trainer.config.CONF_DIR, conf)
        (conf / "experiment" / "broken.yaml").write_text(
            "# @package _global_\nmodel:\n  n_layer: 2\n  d_model: [64\n"
        )
        monkeypatch.setattr(trainer.config, "CONF_DIR", conf)
        before = tree_digest(ws)
        assert train_main(["+experiment=broken", f"run.root={ws / 'runs'}"]) == 2
        line = one_error(capsys)
        where = conf / "experiment" / "broken.yaml"
        assert f"{where}:5:1: invalid YAML: expected ',' or ']'" in line, line
        assert "(while parsing a flow sequence at 4:12)" in line, line
    elif case == "override":
        assert train_main([*train_args(ws), "trainer.profile_steps=[1,"]) == 2
        line = one_error(capsys)
        assert "cannot parse override 'trainer.profile_steps=[1,'" in line, line
    elif case == "init_from-json":
        (ws / "hf").mkdir()
        (ws / "hf" / "config.json").write_text('{\n  "n_layer": 2,\n}\n')
        before = tree_digest(ws)
        with pytest.raises(ValueError) as e:
            check_hf_config(base_model(), str(ws / "hf"))
        assert "config.json is not valid JSON" in one_line(e) and "line 3 column 1" in str(e.value)
    else:
        (ws / "tok.json").write_text('{"model": {\n  "type": "BPE",\n  oops}')
        before = tree_digest(ws)
        with pytest.raises(DataError) as e:
            load_tokenizer(str(ws / "tok.json"))
        assert "not a valid tokenizer.json" in one_line(e) and "line 3 column 3" in str(e.value)
    assert tree_digest(ws) == before


def base_model():
    from models.gpt import GPTConfig

    return GPTConfig()


# ---------------------------------------------------------------------------- GPU settings

GPU_CASES = [
    (["precision=fp8"], "precision=fp8: FP8 training is not built"),
    (
        ["model.activation_checkpointing=sometimes"],
        "activation_checkpointing ('sometimes') must be true, false or 'auto'",
    ),
    (
        ["trainer.compile=true", "parallel=pp2", "cluster.num_workers=2"],
        "trainer.compile with tensor_parallel 1, pipeline_parallel 2",
    ),
    (
        ["trainer.compile=true", "parallel=tp2", "cluster.num_workers=2"],
        "trainer.compile with tensor_parallel 2, pipeline_parallel 1",
    ),
    (["cluster.gpus_per_worker=2"], "cluster.gpus_per_worker (2) > 1: DeepSpeed drives one GPU"),
    (
        ["cluster.num_workers=1", "cluster.gpus_per_worker=1"],
        "no datasheet peak FLOP/s for GPU 'NVIDIA B200'",
    ),
]


@pytest.mark.parametrize("overrides,named", GPU_CASES, ids=[c[0][-1] for c in GPU_CASES])
def test_gpu_settings_that_cannot_be_served_are_one_line(ws, capsys, monkeypatch, overrides, named):
    """A GPU this machine has that the peak-FLOPs table does not know (faked here: this machine
    has none) is asked about once, by the driver, before Ray."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    before = tree_digest(ws)
    rc = train_main([*train_args(ws, "new"), "cluster.cpus_per_worker=1", *overrides])
    line = one_error(capsys)
    assert rc == 2 and named in line, line
    if "gpus_per_worker=1" in overrides:
        assert "set trainer.peak_flops=<dense fp32 FLOP/s of one GPU>" in line, line
    assert tree_digest(ws) == before
