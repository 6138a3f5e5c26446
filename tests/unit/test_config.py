"""Every conf/ file composes and validates; every validation rule fails with its message."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from trainer.config import CONF_DIR, ConfigError, RootConfig, load_config
from trainer.driver.preflight import check_inputs

GROUPS = ["model", "data", "optim", "parallel", "precision", "cluster", "logging"]
EXTRA = {
    "data=parquet": ["data.sources=[/nonexistent/checked/at/prepare.parquet]"],
    "cluster=ray": ["trainer.global_batch_size=64"],
    "parallel=3d": ["cluster.num_workers=8"],
}


def group_options() -> list[str]:
    return [f"{g}={p.stem}" for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def test_every_group_has_files():
    for g in GROUPS + ["experiment", "sweep"]:
        assert list((CONF_DIR / g).glob("*.yaml")), f"conf/{g} is empty"


@pytest.mark.parametrize("override", group_options())
def test_every_conf_file_composes_and_validates(override):
    cfg = load_config([override, *EXTRA.get(override, [])], default_name="t")
    assert isinstance(cfg, RootConfig)
    group, name = override.split("=")
    assert getattr(cfg, group).name == name, "the file's name field must match its file name"
    # frozen: a config cannot drift after validation
    with pytest.raises(dataclasses.FrozenInstanceError):
        getattr(cfg, group).name = "x"


@pytest.mark.parametrize("path", sorted((CONF_DIR / "sweep").glob("*.yaml")), ids=str)
def test_every_sweep_file_composes_and_validates(path):
    # sweep.name is the sweep's own name (null: derived), not the file's, unlike other groups
    cfg = load_config([f"sweep={path.stem}"], default_name="t")
    assert cfg.sweep.max_parallel >= 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sweep.max_parallel = 3


@pytest.mark.parametrize("path", sorted((CONF_DIR / "experiment").glob("*.yaml")), ids=str)
def test_every_experiment_composes(path):
    cfg = load_config([f"+experiment={path.stem}"], default_name="t")
    assert cfg.trainer.max_steps >= 1


def test_defaults_and_contract_overrides():
    cfg = load_config(
        [
            "model=gpt2-124m",
            "parallel=zero3",
            "precision=fp32",
            "trainer.max_steps=7",
            "cluster.num_workers=1",
            "run.root=/tmp/r",
            "run.name=abc",
        ]
    )
    assert (cfg.model.name, cfg.parallel.zero_stage, cfg.precision.dtype_name) == (
        "gpt2-124m",
        3,
        "fp32",
    )
    assert cfg.trainer.max_steps == 7 and cfg.cluster.num_workers == 1
    assert cfg.run_dir == Path("/tmp/r/abc")
    assert cfg.grad_accum == 2  # 16 / (8 x 1)


def test_run_name_defaults_to_model_and_time():
    cfg = load_config([])
    assert cfg.run.name.startswith("gpt-tiny-")


def test_to_dict_roundtrips_through_json():
    cfg = load_config(["+experiment=smoke"], default_name="t")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["model"]["n_layer"] == 2 and d["run"]["name"] == "t"


BAD = [
    (["model.n_layr=3"], r"Key 'n_layr' not in 'GPTConfig'"),
    (["+model.extra=3"], r"extra"),
    (["model=gpt5"], r"model=gpt5 does not exist; choose one of"),
    (["optim.lr=abc"], r"optim.lr=abc.*could not be converted"),
    (["model.n_head=8", "model.n_kv_head=3"], r"n_head \(8\) must be divisible by n_kv_head \(3\)"),
    (["model.d_model=250"], r"d_model \(250\) must be divisible by n_head \(8\)"),
    (
        ["trainer.global_batch_size=15"],
        r"global_batch_size \(15\) must be a multiple of micro_batch_size \(8\) x data-parallel",
    ),
    (
        ["trainer.grad_accum=2"],
        r"global_batch_size \(16\) != micro_batch_size \(8\) x grad_accum \(2\) x data-parallel "
        r"size \(2\) = 32",
    ),
    (["data.seq_len=512"], r"data.seq_len \(512\) exceeds model.block_size \(256\)"),
    (["parallel.zero_stage=4"], r"zero_stage \(4\) must be 0, 1, 2 or 3"),
    (["parallel.zero_stage=-1"], r"zero_stage \(-1\) must be 0, 1, 2 or 3"),
    (["precision=bf16", "precision.fp16=true"], r"bf16 and fp16 are both true"),
    (["precision.fp16=true"], r"precision: name 'auto' with bf16=False, fp16=True: auto chooses"),
    (["parallel=zero2", "parallel.offload_params=true"], r"offload_params needs zero_stage 3"),
    (
        ["parallel=zero2", "parallel.offload_device=nvme"],
        r"offload_device 'nvme' needs zero_stage 3",
    ),
    (
        ["parallel=zero3", "parallel.offload_device=nvme"],
        r"and offload_optimizer or offload_params",
    ),
    (["parallel=zero3-offload", "parallel.offload_device=disk"], r"must be 'cpu' or 'nvme'"),
    (["optim.warmup_steps=-1"], r"warmup_steps \(-1\) must be >= 0"),
    (["trainer.stop_at_step=500"], r"stop_at_step \(500\) must be in \[1, max_steps \(300\)\]"),
    (["logging.mode=loud"], r"mode \('loud'\) must be one of"),
    (["sweep.max_parallel=0"], r"sweep: max_parallel \(0\) must be >= 1"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_fails_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides, default_name="t")
    assert "\n" not in str(e.value)


def test_more_workers_than_the_machine_holds():
    n = (os.cpu_count() or 1) + 1
    with pytest.raises(ConfigError, match=rf"num_workers \({n}\).*this machine has"):
        check_inputs(
            load_config([f"cluster.num_workers={n}", f"trainer.global_batch_size={8 * n}"])
        )


def test_online_wandb_needs_a_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        check_inputs(load_config(["logging.mode=online"]))


def test_vocab_checked_against_the_bpe_size(tmp_path):
    # no tokenizer, nothing prepared: the BPE prepare will train has data.vocab_size tokens
    cfg = load_config(["model.vocab_size=1000", f"data.out_dir={tmp_path}"], default_name="t")
    with pytest.raises(
        ConfigError,
        match=r"model.vocab_size \(1000\) is smaller than the "
        r"tokenizer's vocab \(8192, from data.vocab_size\)",
    ) as e:
        check_inputs(cfg)
    assert "\n" not in str(e.value)


def test_the_vocab_rule_is_written_once():
    # every caller (preflight for a tokenizer, a manifest or a mixture; run.py for the data
    # prepared on the cluster) words it through check_vocab_fits
    from models.config import GPTConfig
    from trainer.config import check_vocab_fits

    check_vocab_fits(GPTConfig(vocab_size=600), 600, "x")
    with pytest.raises(
        ConfigError,
        match=r"^model.vocab_size \(512\) is smaller than the "
        r"tokenizer's vocab \(600, from data/x\)$",
    ):
        check_vocab_fits(GPTConfig(vocab_size=512), 600, "data/x")
    root = Path(__file__).resolve().parents[2]
    for path in ("trainer/config.py", "trainer/driver/preflight.py", "trainer/driver/run.py"):
        text = (root / path).read_text()
        assert text.count("smaller than the tokenizer's vocab") == (path == "trainer/config.py")


def test_vocab_checked_against_prepared_manifest(tmp_path):
    from data_pipeline.manifest import Manifest, TokenizerInfo

    Manifest(
        version=1,
        name="x",
        tokenizer=TokenizerInfo("tokenizer.json", "0" * 64, 9000, 0),
        seq_len=64,
        splits={},
        sources=[],
        num_documents={},
        settings={},
        fingerprint="f",
        created="2026-01-01T00:00:00Z",
    ).save(str(tmp_path))
    with pytest.raises(ConfigError, match=r"vocab \(9000, from .*manifest.json\)"):
        check_inputs(load_config([f"data.out_dir={tmp_path}"]))


def test_vocab_checked_against_given_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(600)}, unk_token="w0"))
    tok.save(str(tmp_path / "tok.json"))
    with pytest.raises(ConfigError, match=r"vocab_size \(512\).*\(600, from"):
        check_inputs(
            load_config(
                [
                    "+experiment=smoke",
                    f"data.tokenizer={tmp_path / 'tok.json'}",
                    f"data.out_dir={tmp_path / 'd'}",
                ]
            )
        )
    with pytest.raises(ConfigError, match="does not exist"):
        check_inputs(load_config([f"data.tokenizer={tmp_path / 'missing.json'}"]))


def test_cli_prints_one_line_and_exits_2(capsys):
    from trainer.train import main

    assert main(["model.n_layr=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "n_layr" in err


def test_local_paths_become_absolute_on_the_driver(tmp_path, monkeypatch):
    # Ray workers run in other directories: a relative run.root would scatter run files.
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["run.root=rel/runs", "run.name=x", "data.out_dir=d"])
    assert cfg.run_dir == tmp_path / "rel" / "runs" / "x"
    assert cfg.data.out_dir == str(tmp_path / "d")
    assert load_config(["run.root=s3://bucket/runs"]).run.root == "s3://bucket/runs"
