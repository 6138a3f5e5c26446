"""One run, one writer (issue 23): the run directory's lease (data_pipeline/lease.py), taken by
the driver of `python -m trainer.train` (in this process's launcher, cluster.launch=auto with
one worker).

A second training of a running run is refused in one line naming the holder, exit 2, while
the first finishes normally with every step logged once; the lease of a run killed with
kill -9 on a lost node (its heartbeat older than the TTL) is taken over by the same command,
which resumes the run with each step once in its metrics.jsonl (the rows the killed run logged
after its last checkpoint set aside in rewound-1/metrics.jsonl).
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from procs import wait_for
from test_in_process import args
from test_interruptions import Run, marker_pid, read_jsonl

from data_pipeline.lease import LEASE_FILE

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def started():
    """The runs a test starts (append them): any still running at its end is killed."""
    runs: list[Run] = []
    yield runs
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(30)


def errors(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("error:")]


def test_a_second_training_of_a_running_run_is_refused_in_one_line(tmp_path, smoke_data, started):
    run_dir = tmp_path / "busy"
    first = Run(
        args(tmp_path, smoke_data, "busy"), tmp_path / "1.log", fault="pause@step:3:hold=60"
    )
    started.append(first)
    wait_for(lambda: marker_pid(run_dir, "step", 3, 0), 600, "step 3", first)
    holder = json.loads((run_dir / LEASE_FILE).read_text())
    assert holder["pid"] == first.proc.pid  # the driver holds it (in-process: it trains too)
    before = sorted(p.name for p in run_dir.iterdir())

    second = Run(args(tmp_path, smoke_data, "busy"), tmp_path / "2.log")
    started.append(second)
    assert second.wait() == 2, second.output[-3000:]
    lines = errors(second.output)
    assert len(lines) == 1 and "Traceback" not in second.output, second.output[-3000:]
    line = lines[0]
    assert line.startswith(f"error: run 'busy' ({run_dir}) is in use by host {holder['host']} ")
    assert f"pid {first.proc.pid} since " in line and " s ago (lease " in line
    assert "stop it (Ctrl-C, SIGTERM or `ray job stop`" in line and "RAYGPT_LEASE_TTL_S" in line
    assert first.proc.poll() is None  # the first still runs: it was held, not disturbed
    assert json.loads((run_dir / LEASE_FILE).read_text())["token"] == holder["token"]
    assert set(before) <= {p.name for p in run_dir.iterdir()}

    assert first.wait() == 0, first.output[-3000:]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, 7)), steps  # every step once: one writer
    assert not (run_dir / LEASE_FILE).exists()  # released at exit


def test_a_killed_run_on_a_lost_node_is_taken_over_and_resumed_with_each_step_once(
    tmp_path, smoke_data, monkeypatch, started
):
    monkeypatch.setenv("RAYGPT_LEASE_TTL_S", "3")  # renewed every 0.75 s
    run_dir = tmp_path / "lost"
    # Checkpoint 4's upload is held while steps 4 and 5 are logged: killed there, the run's
    # latest checkpoint is 3 and its metrics.jsonl holds steps 4 and 5 too.
    first = Run(args(tmp_path, smoke_data, "lost"), tmp_path / "1.log", fault="pause@upload:4")
    started.append(first)
    wait_for(lambda: marker_pid(run_dir, "upload", 4, 0), 600, "the upload of checkpoint 4", first)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: len(read_jsonl(metrics)) >= 5, 120, "step 5", first)
    first.proc.send_signal(signal.SIGKILL)
    assert first.wait(60) == -signal.SIGKILL
    # The holder ran on a node that is gone: its pid means nothing here, only its heartbeat.
    lease = run_dir / LEASE_FILE
    rec = json.loads(lease.read_text())
    lease.write_text(json.dumps({**rec, "host": "node-7", "machine": "node-7/lost"}))

    wait_for(lambda: _age(lease) > 3.5, 30, "the heartbeat to pass the TTL")

    second = Run(args(tmp_path, smoke_data, "lost"), tmp_path / "2.log")
    started.append(second)
    assert second.wait() == 0, second.output[-3000:]
    assert f"took over the lease of host node-7 pid {first.proc.pid}" in second.output
    assert "its heartbeat is " in second.output and " s old (TTL 3 s)" in second.output
    assert "resumed from" in second.output and "at step 3" in second.output
    # The history holds each step once; the rows logged after checkpoint 3 are kept apart.
    assert "rewound the run files to step 3: set aside " in second.output
    steps = [r["step"] for r in read_jsonl(metrics)]
    assert steps == list(range(1, 7)), steps
    aside = [r["step"] for r in read_jsonl(run_dir / "rewound-1" / "metrics.jsonl")]
    assert aside[:2] == [4, 5] and aside == sorted(set(aside)), aside
    assert not lease.exists()  # released at exit


def _age(lease) -> float:
    return time.time() - json.loads(lease.read_text())["heartbeat"]
