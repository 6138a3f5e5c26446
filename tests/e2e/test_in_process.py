"""cluster.launch: one local worker trains in the driver's process, without Ray, and its run
moves to Ray Train and back.

A run in this process is stopped by SIGTERM (checkpoint, exit 143), resumed by Ray Train
(cluster.launch=ray) from the checkpoint it wrote, and finished in this process again; its
losses and the samples it trained on equal those of an uninterrupted run in this process.
Real subprocesses of `python -m trainer.train`, real Ray for the middle leg.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from procs import wait_for
from test_interruptions import Run, losses, marker_pid, read_jsonl, samples

STEPS = 6
pytestmark = pytest.mark.timeout(900)


def args(root: Path, data: str, name: str, *more: str) -> list[str]:
    return [
        "+experiment=smoke",
        "logging.mode=disabled",
        "precision=fp32",
        "parallel=zero2",
        "cluster.num_workers=1",
        "trainer.global_batch_size=4",
        f"trainer.max_steps={STEPS}",
        "trainer.checkpoint_interval=1",
        "trainer.keep_last=2",
        "trainer.eval_interval=0",
        "trainer.sample_tokens=0",
        "trainer.log_sample_ids=true",
        f"data.out_dir={data}",
        f"run.root={root}",
        f"run.name={name}",
        *more,
    ]


def registered(run_dir: Path) -> list[str]:
    index = json.loads((run_dir / "checkpoints.json").read_text())
    return [c["name"] for c in index["checkpoints"]]


@pytest.mark.drill  # make test-drills: four runs, one on Ray (make test keeps two_runs below)
def test_a_run_moves_between_this_process_and_ray(tmp_path, smoke_data):
    ref = Run(args(tmp_path, smoke_data, "ref"), tmp_path / "ref.log")
    assert ref.wait() == 0, ref.output[-3000:]
    assert "(RayTrainWorker" not in ref.output  # no Ray worker: the driver trained
    node = json.loads((tmp_path / "ref" / "memory" / "rank_0.json").read_text())["node_id"]
    assert node.startswith("local:")
    # keep_last=2: the others were deleted, the index lists two.
    assert registered(tmp_path / "ref") == ["checkpoint_00000005", "checkpoint_00000006"]
    assert sorted(p.name for p in (tmp_path / "ref").glob("checkpoint_0*")) == registered(
        tmp_path / "ref"
    )

    run_dir = tmp_path / "moved"
    # 1. In this process; held at step 4 and sent SIGTERM: checkpoint at the boundary, exit 143.
    first = Run(
        args(tmp_path, smoke_data, "moved"), tmp_path / "1.log", fault="pause@step:4:hold=4"
    )
    wait_for(lambda: marker_pid(run_dir, "step", 4, 0), 300, "step 4", first)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait() == 143, first.output[-3000:]
    assert "stopped at step 4 (SIGTERM)" in first.output
    assert registered(run_dir)[-1] == "checkpoint_00000004"

    # 2. Ray Train resumes the checkpoint this process registered, and stops at step 5.
    second = Run(
        args(tmp_path, smoke_data, "moved", "cluster.launch=ray", "trainer.stop_at_step=5"),
        tmp_path / "2.log",
    )
    assert second.wait() == 0, second.output[-3000:]
    assert "(RayTrainWorker" in second.output
    assert "resumed from" in second.output and "checkpoint_00000004 at step 4" in second.output

    # 3. This process resumes what Ray registered and finishes.
    third = Run(args(tmp_path, smoke_data, "moved"), tmp_path / "3.log")
    assert third.wait() == 0, third.output[-3000:]
    assert "checkpoint_00000005 at step 5" in third.output

    got, want = losses(run_dir), losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    assert samples(run_dir) == samples(tmp_path / "ref")
    every = [i for ids in samples(run_dir).values() for i in ids]
    assert len(every) == len(set(every)) == STEPS * 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["consumed_samples"] == STEPS * 4
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == STEPS


def test_two_runs_in_one_process(tmp_path, smoke_data):
    """A second in-process run in the same process (a max_failures restart, a notebook, these
    tests) reuses the process group DeepSpeed registered; it used to fail with "Group ... is
    not registered" once the first run had destroyed it."""
    import threading

    from trainer.config import load_config
    from trainer.driver.run import run_training

    before = set(threading.enumerate())
    for name in ("one", "two"):
        cfg = load_config(args(tmp_path, smoke_data, name, "trainer.max_steps=2"))
        summary = run_training(cfg)
        assert summary["finished"] and summary["final_step"] == 2, name
        # The run's data and checkpoint threads ended with it (the process goes on).
        left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
        assert not [n for n in left if n.startswith(("data-", "row-group", "checkpoint-"))], left


def test_a_run_directory_of_an_earlier_raygpt_still_resumes(tmp_path, smoke_data):
    """tests/fixtures/legacy_run_2026-12-07 is a run directory as raygpt wrote it on 2026-12-07
    (eb47fcb: registrations in Ray Train's snapshot file, no checkpoints.json), stopped at
    step 4 of 6. Resumed by today's code, it indexes that checkpoint and trains steps 5 and 6
    to exactly the losses of that day's uninterrupted run of the same config."""
    from trainer.config import load_config
    from trainer.driver.run import run_training

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_run_2026-12-07"
    shutil.copytree(fixture, tmp_path / "legacy")
    cfg = load_config(
        [
            *args(tmp_path, smoke_data, "legacy"),
            "trainer.global_batch_size=8",
            "trainer.checkpoint_interval=4",
            "trainer.log_sample_ids=false",
        ]
    )
    summary = run_training(cfg)
    assert summary["finished"] and summary["final_step"] == STEPS
    assert registered(tmp_path / "legacy") == ["checkpoint_00000004", "checkpoint_00000006"]
    got = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "legacy" / "metrics.jsonl")}
    want = json.loads((fixture / "uninterrupted_losses.json").read_text())["loss"]
    assert [got[5], got[6]] == [want["5"], want["6"]]  # fp32, one worker: exact


def test_a_kill_during_a_background_checkpoint_write_leaves_the_previous_one(tmp_path, smoke_data):
    """Checkpoints are written in the background (trainer/checkpoint/manager.py): the step
    loop goes on while checkpoint 4 is held before its files reach the run directory, the
    next save waits for it, and kill -9 then leaves checkpoint 3 the latest; the same command
    resumes from it to the losses of an uninterrupted run."""
    ref = Run(args(tmp_path, smoke_data, "ref"), tmp_path / "ref.log")
    assert ref.wait() == 0, ref.output[-3000:]
    run_dir = tmp_path / "killed"
    first = Run(args(tmp_path, smoke_data, "killed"), tmp_path / "1.log", fault="pause@upload:4")
    wait_for(lambda: marker_pid(run_dir, "upload", 4, 0), 300, "the write of checkpoint 4", first)
    # Training went on past the held write: step 5 is logged while checkpoint 4 is in flight.
    wait_for(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= 5, 120, "step 5", first)
    assert registered(run_dir)[-1] == "checkpoint_00000003"
    first.proc.send_signal(signal.SIGKILL)
    assert first.wait(60) == -signal.SIGKILL
    assert registered(run_dir)[-1] == "checkpoint_00000003"
    assert not (run_dir / "checkpoint_00000004" / "files" / "rank_0.json").exists()

    second = Run(args(tmp_path, smoke_data, "killed"), tmp_path / "2.log")
    assert second.wait() == 0, second.output[-3000:]
    assert "resumed from" in second.output and "checkpoint_00000003 at step 3" in second.output
    got = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}
    want = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl")}
    assert got == want  # fp32, one worker: exact (the last row of a step wins)


@pytest.mark.drill  # two runs, one in emulated bf16 (tests/unit/test_precision.py: the rule)
def test_a_resume_keeps_the_precision_its_checkpoint_recorded(tmp_path, smoke_data, capsys):
    """precision=auto (this CPU: fp32) on the resume of a run trained in bf16 keeps bf16, and
    the checkpoint records it; precision=fp32 on a resume command would change it."""
    from trainer.checkpoint.format import read_trainer_state
    from trainer.checkpoint.index import latest
    from trainer.config import load_config
    from trainer.driver.run import run_training

    base = [a for a in args(tmp_path, smoke_data, "p") if not a.startswith("precision=")]
    first = run_training(load_config([*base, "precision=bf16", "trainer.max_steps=2"]))
    assert first["precision"] == "bf16"
    capsys.readouterr()
    resumed = run_training(load_config([*base, "trainer.max_steps=3"]))  # precision: auto
    out = capsys.readouterr().out
    assert "precision: auto -> bf16 (kept from the checkpoint this run resumes)" in out
    assert resumed["finished"] and resumed["final_step"] == 3 and resumed["precision"] == "bf16"
    saved = read_trainer_state(latest(str(tmp_path / "p")).uri)["config"]["precision"]
    assert saved["name"] == "bf16" and saved["bf16"] is True
