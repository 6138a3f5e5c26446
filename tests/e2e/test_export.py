"""`python -m trainer.export` on real checkpoints: 2 Ray workers, DeepSpeed ZeRO-3 (fp32),
ZeRO-2 (bf16), AutoTP tensor parallel (fp32) and pipeline parallel (fp32) on the CPU accelerator,
exported and loaded back with transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import GPT
from trainer.config import load_config
from trainer.export import consolidated_state_dict, find_checkpoint

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("ray_cluster")]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
SMOKE = ["+experiment=smoke", "logging.mode=disabled", "trainer.sample_tokens=0"]


def train(tmp_path_factory, data: str, name: str, *extra: str):
    from trainer.driver.run import run_training

    root = tmp_path_factory.mktemp(name)
    cfg = load_config(
        [
            *SMOKE,
            f"run.root={root}",
            f"run.name={name}",
            f"data.out_dir={data}",
            f"trainer.max_steps={STEPS}",
            "trainer.eval_interval=0",
            "cluster.num_workers=2",
            *extra,
        ]
    )
    summary = run_training(cfg)
    assert summary["finished"], summary
    return cfg, cfg.run_dir


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, smoke_data):
    return train(tmp_path_factory, smoke_data, "z3", "parallel=zero3", "precision=fp32")


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, smoke_data):
    return train(tmp_path_factory, smoke_data, "z2", "parallel=zero2", "precision=bf16")


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory, smoke_data):
    return train(tmp_path_factory, smoke_data, "tp2", "parallel=tp2", "precision=fp32")


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory, smoke_data):
    return train(tmp_path_factory, smoke_data, "pp2", "parallel=pp2", "precision=fp32")


@pytest.fixture(scope="module")
def tp2xpp2_run(tmp_path_factory, smoke_data):
    workers = ["cluster.num_workers=4", "cluster.cpus_per_worker=0.5"]
    return train(tmp_path_factory, smoke_data, "3d", "parallel=3d", "precision=fp32", *workers)


@pytest.fixture(scope="module")
def sp2_run(tmp_path_factory, smoke_data):
    return train(tmp_path_factory, smoke_data, "sp2", "parallel=sp2", "precision=fp32")


def export_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "trainer.export", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


def val_batch(data: str, seq_len: int) -> torch.Tensor:
    from data_pipeline.loader import TokenShards

    shards = TokenShards(data, "val")
    rows = shards.get_batch(np.arange(min(4, len(shards))))
    return torch.as_tensor(rows[:, :seq_len], dtype=torch.long)


def val_loss_of(model: GPT, cfg, data: str) -> float:
    """The training loop's evaluate(), replayed on one process for every data-parallel rank."""
    from data_pipeline.loader import DistributedLoader, TokenShards

    t, dp = cfg.trainer, cfg.dp_size
    losses = []
    for rank in range(dp):
        loader = DistributedLoader(
            TokenShards(data, "val"),
            global_batch=t.micro_batch_size * t.eval_batches * dp,
            micro_batch=t.micro_batch_size,
            dp_rank=rank,
            dp_size=dp,
            seed=t.seed,
            shuffle=False,
        )
        with torch.no_grad():
            for x, y in loader.next_step()[: t.eval_batches]:
                losses.append(model(x, y)[1].item())
    return sum(losses) / len(losses)


def assert_equals_saved_modules(cfg, ckpt: Path, sd: dict[str, torch.Tensor]) -> None:
    """fp32 tensor/pipeline parallel runs: the module weights each rank saved are exactly the
    matching pieces of the consolidated weights (written here without the export's code)."""
    tag_dir = ckpt / "ds" / "ds"
    if cfg.parallel.tensor_parallel > 1 and cfg.parallel.pipeline_parallel > 1:
        # 3-D: each tensor rank of a stage saves its slice of the stage's layers
        tp, n = cfg.parallel.tensor_parallel, cfg.model.n_layer
        split = 0
        for i in range(n):
            for rank in range(tp):
                f = tag_dir / f"layer_{i + 1:02d}-model_{rank:02d}-model_states.pt"
                for name, t in torch.load(f, weights_only=True).items():
                    whole = sd[f"blocks.{i}.{name}"]
                    if t.shape == whole.shape:
                        assert torch.equal(t, whole), name
                        continue
                    dim = 0 if t.shape[0] != whole.shape[0] else 1
                    split += 1
                    k = t.shape[dim]
                    assert k * tp == whole.shape[dim], name
                    assert torch.equal(t, whole.narrow(dim, rank * k, k)), name
        assert split == tp * n * 10
        return
    if cfg.parallel.tensor_parallel > 1:
        tp = cfg.parallel.tensor_parallel
        split = 0
        for rank in range(tp):
            module = torch.load(tag_dir / f"mp_rank_{rank:02d}_model_states.pt", weights_only=True)
            for name, t in module["module"].items():
                whole = sd[name]
                if t.shape == whole.shape:
                    assert torch.equal(t, whole), name
                    continue
                dim = 0 if t.shape[0] != whole.shape[0] else 1
                split += 1
                assert t.shape[dim] * tp == whole.shape[dim], name
                n = t.shape[dim]
                assert torch.equal(t, whole.narrow(dim, rank * n, n)), name
        # q/k/v/up weights and biases (column), o_proj/down weights (row), on every rank
        assert split == tp * cfg.model.n_layer * 10
    if cfg.parallel.pipeline_parallel > 1:
        n = cfg.model.n_layer
        layers = {0: "", n + 1: ""} | {i + 1: f"blocks.{i}." for i in range(n)}
        for index, prefix in layers.items():
            layer = torch.load(tag_dir / f"layer_{index:02d}-model_states.pt", weights_only=True)
            for name, t in layer.items():
                assert torch.equal(t, sd[prefix + name]), prefix + name


@pytest.mark.parametrize(
    "run_name",
    [
        "zero3_run",
        # make test-drills: ZeRO-2, TP and PP runs (TP/PP merges are unit-tested in test_export_unit)
        pytest.param("zero2_run", marks=pytest.mark.drill),
        pytest.param("tp2_run", marks=pytest.mark.drill),
        pytest.param("pp2_run", marks=pytest.mark.drill),
        pytest.param("tp2xpp2_run", marks=pytest.mark.drill),
        pytest.param("sp2_run", marks=pytest.mark.drill),
    ],
)
def test_export_loads_in_transformers_with_equal_logits(run_name, request, tmp_path, smoke_data):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    cfg, run_dir = request.getfixturevalue(run_name)
    out = tmp_path / "hf"
    proc = export_cli(run_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "error:" not in proc.stderr and "warning:" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary left behind

    ckpt = Path(find_checkpoint(run_dir))
    assert ckpt.name == f"checkpoint_{STEPS:08d}"
    model_cfg, sd = consolidated_state_dict(ckpt)
    assert model_cfg == cfg.model
    assert sd["lm_head.weight"] is sd["wte.weight"]  # tied: one tensor under both names
    model = GPT(model_cfg).eval()
    model.load_state_dict(sd, strict=True)

    # The consolidated weights are the trained ones (checked independently of export code).
    if not cfg.precision.bf16:
        # fp32: the evaluation at the last step, replayed on the consolidated model, gives the
        # logged loss (ZeRO-3 keeps no full weights anywhere but the shards).
        assert_equals_saved_modules(cfg, ckpt, sd)
        logged = [json.loads(ln) for ln in (run_dir / "eval.jsonl").read_text().splitlines()]
        assert logged[-1]["step"] == STEPS
        assert val_loss_of(model, cfg, smoke_data) == pytest.approx(
            logged[-1]["val_loss"], abs=1e-4
        )
    else:
        # ZeRO-2 bf16: rank 0's module state holds the bf16 copy of the fp32 master weights.
        module = torch.load(ckpt / "ds" / "ds" / "mp_rank_00_model_states.pt", weights_only=True)
        module = module["module"]
        assert module.keys() == sd.keys()
        for name, t in module.items():
            assert t.dtype == torch.bfloat16
            assert torch.equal(sd[name].to(torch.bfloat16), t), name
        assert any(not torch.equal(sd[n], sd[n].to(torch.bfloat16).float()) for n in sd)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    x = val_batch(smoke_data, cfg.data.seq_len)
    with torch.no_grad():
        diff = (model(x)[0] - hf(x).logits).abs().max().item()
    assert diff <= 1e-4

    manifest = json.loads((Path(smoke_data) / "manifest.json").read_text())
    eos = manifest["tokenizer"]["eos_id"]
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["torch_dtype"]) == (
        eos,
        eos,
        "float32",
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ref_tok = Tokenizer.from_file(str(Path(smoke_data) / manifest["tokenizer"]["file"]))
    text = "def export(path):\n    return {'ok': True}  # ünïcode<|endoftext|>"
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert (
        ids
        == ref_tok.encode(text).ids
        == Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids
    )
    assert eos in ids and hf_tok.eos_token_id == eos and hf_tok.bos_token_id == eos
    assert hf_tok.decode(ids) == ref_tok.decode(ids, skip_special_tokens=False)


def test_bad_inputs_exit_2_and_write_nothing(zero3_run, tmp_path):
    _, run_dir = zero3_run
    out = tmp_path / "out"

    proc = export_cli(tmp_path / "missing", out)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert "does not exist" in error_lines(proc)[0]
    assert not out.exists()

    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    proc = export_cli(empty_run, out)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert "no complete checkpoint_" in error_lines(proc)[0]
    assert not out.exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    proc = export_cli(run_dir, taken)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert "not empty" in error_lines(proc)[0]
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert (taken / "keep.txt").read_text() == "mine"

    broken = tmp_path / "broken" / f"checkpoint_{STEPS:08d}"
    shutil.copytree(find_checkpoint(run_dir), broken)
    states = broken / "ds" / "ds" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    data = states.read_bytes()
    states.write_bytes(data[: len(data) // 2])
    proc = export_cli(broken, out)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    # the integrity records catch it before DeepSpeed reads a byte
    assert "is damaged" in error_lines(proc)[0] and "truncated" in error_lines(proc)[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty_run", "taken"]
