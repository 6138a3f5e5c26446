"""The NaN guard on real 2-worker runs: a poisoned step is skipped and the run ends finite;
repeated bad steps roll back (or stop with one clear line)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from trainer.config import load_config

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("ray_cluster")]
BASE = [
    "+experiment=smoke",
    "logging.mode=disabled",
    "trainer.sample_tokens=0",
    "precision=fp32",
    "trainer.max_steps=10",
    "trainer.eval_interval=0",
]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(tmp_path, data, name, *extra):
    from trainer.driver.run import run_training

    cfg = load_config(
        [*BASE, f"data.out_dir={data}", f"run.root={tmp_path}", f"run.name={name}", *extra]
    )
    return run_training(cfg), cfg.run_dir


def test_poisoned_step_is_skipped_and_the_run_ends_finite(tmp_path, smoke_data):
    summary, run_dir = run(
        tmp_path,
        smoke_data,
        "nan",
        "parallel=zero2",
        "trainer.inject_nan_at_steps=[4]",
        "trainer.checkpoint_interval=0",
    )
    by_step = {r["step"]: r for r in rows(run_dir)}
    assert by_step[4]["loss"] == "nan" and by_step[4]["skipped_steps"] == 1
    assert by_step[3]["skipped_steps"] == 0 and by_step[10]["skipped_steps"] == 1
    assert all(math.isfinite(by_step[s]["loss"]) for s in range(5, 11))
    assert summary["finished"] and summary["skipped_steps"] == 1
    assert math.isfinite(summary["final_val_loss"])
    # The weights stayed finite: the final checkpoint exports a finite model.
    from trainer.export import consolidated_state_dict

    _, sd = consolidated_state_dict(Path(summary["checkpoint"]))
    assert all(bool(t.isfinite().all()) for t in sd.values())


def test_repeated_bad_steps_roll_back_past_the_bad_window(tmp_path, smoke_data):
    summary, run_dir = run(
        tmp_path,
        smoke_data,
        "rb",
        "parallel=zero1",
        "trainer.inject_nan_at_steps=[6,7]",
        "guard.max_consecutive=2",
        "trainer.checkpoint_interval=4",
    )
    steps = [r["step"] for r in rows(run_dir)]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10], steps
    assert summary["finished"] and summary["skipped_steps"] == 2
    # The offending window was skipped, not replayed: 13 steps' worth of data consumed.
    assert summary["consumed_samples"] == 13 * 8


@pytest.mark.drill  # make test-drills (the trigger itself: test_guard.py, consecutive bad steps)
def test_repeated_bad_steps_stop_with_one_line(tmp_path, smoke_data):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.train",
            *BASE,
            f"data.out_dir={smoke_data}",
            f"run.root={tmp_path}",
            "run.name=stop",
            "trainer.inject_nan_at_steps=[3,4]",
            "guard.max_consecutive=2",
            "guard.on_repeated=stop",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "2 bad steps in a row up to step 4" in errors[0], proc.stderr[
        -2000:
    ]
