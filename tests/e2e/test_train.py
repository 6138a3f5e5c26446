"""End to end on a real local Ray cluster: 2 workers, DeepSpeed on the CPU accelerator (gloo),
real Parquet shards, real W&B in offline mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import load_config

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("ray_cluster")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


SMOKE = ["+experiment=smoke", "logging.mode=offline"]


def run(tmp_path: Path, data: str, name: str, *extra: str) -> tuple[dict, Path]:
    from trainer.driver.run import run_training

    cfg = load_config(
        [*SMOKE, f"run.root={tmp_path}", f"run.name={name}", f"data.out_dir={data}", *extra]
    )
    return run_training(cfg), cfg.run_dir


def test_two_workers_zero2_bf16_trains_and_logs(tmp_path, smoke_data):
    summary, run_dir = run(
        tmp_path, smoke_data, "z2", "parallel=zero2", "precision=bf16", "trainer.profile_steps=[2]"
    )

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 21))
    for key in ("time", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "consumed_samples"):
        assert all(key in m for m in metrics), key
    # Each row's wall clock (a checkpoint step's stall shows between two rows).
    times = [m["time"] for m in metrics]
    assert times == sorted(times) and times[-1] - times[0] < 3600
    assert abs(times[-1] - (run_dir / "metrics.jsonl").stat().st_mtime) < 600
    # Step-time breakdown (seconds per step; ZeRO-2 on CPU: gradient reduction is measured).
    phases = ["data", "forward", "backward", "comm", "optimizer"]
    for m in metrics:
        assert all(m[f"{p}_time_s"] >= 0 for p in phases), m
        assert m["comm_time_s"] <= m["backward_time_s"], m
        assert (
            m["forward_time_s"] + m["backward_time_s"] + m["optimizer_time_s"]
            <= m["step_time_s"] * 1.05
        ), m
        assert m["rss_mib"] > 0 and m["peak_rss_mib"] >= m["rss_mib"]

    # trainer.profile_steps=[2]: one Chrome trace per rank, of step 2 only.
    traces = sorted(p.name for p in (run_dir / "profile").iterdir())
    assert traces == ["rank_0.json", "rank_1.json"], traces
    trace = (run_dir / "profile" / "rank_0.json").read_text()
    assert "train_step 2" in trace and "train_step 3" not in trace
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    assert last < first - 0.2, f"loss did not fall: {first} -> {last}"
    assert metrics[-1]["consumed_samples"] == 20 * 8
    assert all(m["tokens_per_sec"] > 0 and 0 < m["mfu"] < 1 for m in metrics)

    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [e["step"] for e in evals] == [10, 20]
    assert all(e["val_ppl"] == pytest.approx(2.718281828 ** e["val_loss"], rel=1e-6) for e in evals)
    # bits per byte: the loss over the val split's raw UTF-8 bytes per token (its manifest)
    val = json.loads((Path(smoke_data) / "manifest.json").read_text())["splits"]["val"]
    per_token = val["num_bytes"] / (val["num_tokens"] + val["dropped_tokens"])
    for e in evals:
        assert e["val_bpb"] == pytest.approx(e["val_loss"] / per_token / 0.6931471805599453)

    s = json.loads((run_dir / "summary.json").read_text())
    assert s["finished"] and s["final_step"] == 20
    assert s["final_val_loss"] < s["uniform_loss"]
    assert s["final_val_bpb"] == evals[-1]["val_bpb"]
    assert s["sample"] and isinstance(s["sample"], str)
    # two throughputs, named apart: training only, and end to end (eval + checkpoints too)
    assert 0 < s["end_to_end_tokens_per_sec"] < s["train_tokens_per_sec"]
    assert "tokens_per_sec" not in s
    assert set(s["step_time_breakdown_s"]) == {"step", *phases}
    assert summary["checkpoint"].endswith("checkpoint_00000020")
    assert (Path(summary["checkpoint"]) / "trainer_state.json").is_file()

    cfg = (run_dir / "config.yaml").read_text()
    assert "zero_stage: 2" in cfg and "name: z2" in cfg

    # W&B offline: a run directory whose record file holds the logged metric names.
    wandb_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1, list((run_dir / "wandb").rglob("*"))
    blob = wandb_files[0].read_bytes()
    assert b"val/bpb" in blob
    assert b"train/loss" in blob and b"val/loss" in blob and s["wandb_id"].encode() in blob
    assert b"time/forward_s" in blob and b"memory/rss_mib" in blob
