"""The CLI as users run it: bad input fails fast with one line; Hydra multirun; ray job submit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_helpers import error_lines, run_cli, tree_digest
from ray_nodes import TwoNodes

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
SMOKE = ["+experiment=smoke", "logging.mode=disabled", "trainer.sample_tokens=0"]


cli = run_cli


@pytest.fixture
def existing_run(tmp_path) -> Path:
    """A run directory from an earlier run, which bad input must leave untouched."""
    run = tmp_path / "runs" / "keep"
    (run / "checkpoint_00000010").mkdir(parents=True)
    (run / "checkpoint_00000010" / "trainer_state.json").write_text('{"step": 10}')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (run / "config.yaml").write_text("model: {}\n")
    return run


def _bad_sources(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["a b", "c d"]}), no_text)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("   \n")
    return {
        "missing path": ([f"data.sources=[{tmp_path / 'nope.parquet'}]"], "does not exist"),
        "no text column": ([f"data.sources=[{no_text}]"], "no column 'text'"),
        "empty source": ([f"data.sources=[{empty}]"], "no documents"),
        "typo key": (["trainer.max_stepz=3"], "max_stepz"),
    }


@pytest.mark.parametrize("case", ["missing path", "no text column", "empty source", "typo key"])
def test_bad_input_one_line_nonzero_and_run_dir_untouched(case, tmp_path, existing_run):
    overrides, message = _bad_sources(tmp_path)[case]
    before = tree_digest(existing_run)
    proc = cli(
        "trainer.train",
        *SMOKE,
        "data=parquet",
        "data.vocab_size=512",
        "data.seq_len=64",
        f"data.out_dir={tmp_path / 'data'}",
        f"run.root={existing_run.parent}",
        "run.name=keep",
        *overrides,
    )
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert tree_digest(existing_run) == before
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


@pytest.mark.drill  # make test-drills: tests/e2e/test_sweep.py covers parallel sweeps in make test
def test_multirun_runs_each_job_as_its_own_run(tmp_path, smoke_data):
    proc = cli(
        "trainer.train",
        "-m",
        *SMOKE[:1],
        "logging.mode=offline",
        "trainer.sample_tokens=0",
        "optim.lr=1e-3,3e-4",
        "trainer.max_steps=2",
        "trainer.eval_interval=0",
        "trainer.checkpoint_interval=0",
        "cluster.num_workers=1",
        "trainer.global_batch_size=4",
        f"data.out_dir={smoke_data}",
        f"run.root={tmp_path}",
        "run.name=sw",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.name.startswith("sw-"))
    assert len(runs) == 2, list(tmp_path.iterdir())
    lrs, groups = [], set()
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["finished"] and summary["run_name"] == run.name
        lrs.append(float(_yaml_value(run / "config.yaml", "lr")))
        blob = next((run / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
        groups.add(b"sweep-" in blob)
    assert sorted(lrs) == [3e-4, 1e-3]
    assert groups == {True}


def test_multirun_validates_every_job_before_running(tmp_path):
    proc = cli("trainer.train", "-m", *SMOKE, "model.n_head=4,3", f"run.root={tmp_path}")
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "model.n_head=3" in error_lines(proc)[0]
    assert not any(tmp_path.iterdir())


def _yaml_value(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        if line.strip().startswith(f"{key}:"):
            return line.split(":", 1)[1].strip()
    raise KeyError(key)


@pytest.mark.drill  # make test-drills, with test_users_ground's submitted jobs
@pytest.mark.timeout(600)
def test_ray_job_submit_trains_and_checkpoints(tmp_path, smoke_data):
    """`ray job submit` to a running cluster (a `ray start` head of this test's own, stopped by
    PID: tests/ray_nodes.py) trains, checkpoints and writes its summary."""
    ray_bin = str(Path(PY).parent / "ray")
    with TwoNodes.start(second=False) as node:
        runtime_env = json.dumps({"excludes": ["/.venv", "/.git", "/runs", "/data", "*.egg-info"]})
        cmd = [
            ray_bin, "job", "submit", f"--address={node.dashboard_url}", "--working-dir=.",
            f"--runtime-env-json={runtime_env}", "--",
            PY, "-m", "trainer.train", *SMOKE, "cluster.address=auto", "trainer.max_steps=4",
            "trainer.checkpoint_interval=2", "trainer.eval_interval=0", "cluster.num_workers=1",
            "trainer.global_batch_size=4", f"data.out_dir={smoke_data}",
            f"run.root={tmp_path / 'runs'}", "run.name=job",
        ]  # fmt: skip
        deadline = time.monotonic() + 120
        while True:  # the head's job agent starts a few seconds after `ray start` returns
            submit = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=480, env=node.env
            )
            if "No available agent" not in submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
    assert "succeeded" in submit.stdout + submit.stderr
    run = tmp_path / "runs" / "job"
    assert (run / "checkpoint_00000004" / "trainer_state.json").is_file()
    state = json.loads((run / "checkpoint_00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert json.loads((run / "summary.json").read_text())["finished"]
