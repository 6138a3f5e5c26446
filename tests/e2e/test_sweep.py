"""Sweeps for real: `python -m trainer.train -m ...` on a two-node Ray cluster (one CPU each, the
module's; tests/ray_nodes.py), tiny jobs of one worker each, the smallest runs that train.

1. A 4-job sweep, two at a time, submitted with `python -m cluster.submit -- python -m
   trainer.train -m ...` (a Ray job): jobs 0 and 1 overlap, job 2 starts as soon as the first
   of them ends and job 3 as soon as the other does, never three at once, and the sweep takes
   well under the sum of its jobs. `ray job stop` (SIGTERM to the sweep and every process
   under it) while job 2 trains: it checkpoints and stops, the sweep exits. The same sweep
   again (run here against the cluster): jobs 0 and 1 are not rerun, job 2 resumes from its
   checkpoint and finishes while job 3 fails at run time and is reported with its error line;
   the table and the plot are written.
2. A job that can never fit the joined cluster is refused in one line before any job starts.
3. SIGKILL of the sweep's process: its jobs die with it (nothing trains on unwatched).
4. Optuna's sweeper (hydra-optuna-sweeper) through the same launcher: a 2-trial study.
5. Bad input to `cluster.submit` of a sweep: the entrypoint's own check refuses it in one line,
   nothing is submitted or written.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import error_lines, run_cli
from procs import Bg, wait_for
from ray_nodes import TwoNodes, alive, auth_env, driver_env

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

# The smallest run that trains: fp32, one worker, no eval/sample/W&B on the way, a given peak
# FLOP/s (not measured), no checkpoint but the last (or the one a stop writes).
QUICK = [
    "+experiment=smoke",
    "precision=fp32",
    "logging.mode=disabled",
    "cluster.num_workers=1",
    "cluster.cpus_per_worker=1",
    "trainer.sample_tokens=0",
    "trainer.eval_interval=0",
    "trainer.checkpoint_interval=0",
    "trainer.peak_flops=1e11",
    "run.name=sw",
]
STEPS = 16
HOLD_S = 10  # the drill holds job 2 at step 6 until the stop has come
# `ray job stop`'s own call (JobSubmissionClient.stop_job), in a process started ahead so that the
# stop follows the moment the test asks for it (`ray job stop` would first import Ray).
STOPPER = """
import sys
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
print("ready", flush=True)
job_id = sys.stdin.readline().strip()
print("stopping", job_id, client.stop_job(job_id), flush=True)
"""


@pytest.fixture(scope="module")
def nodes():
    with TwoNodes.start() as n:
        yield n


def state(d: Path) -> dict:
    return json.loads((d / "sweep.json").read_text())


def jobs(d: Path) -> dict[int, dict]:
    try:
        return {j["num"]: j for j in state(d)["jobs"]}
    except (FileNotFoundError, ValueError):
        return {}


def t(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.drill  # make test-drills: three rounds of parallel jobs
def test_submitted_sweep_runs_in_parallel_survives_a_failure_stops_and_resumes(
    tmp_path, smoke_data, nodes
):
    root, d = tmp_path / "runs", tmp_path / "runs" / "sweep-sw"
    sweep = [
        *QUICK,
        f"data.out_dir={smoke_data}",
        f"run.root={root}",
        f"trainer.max_steps={STEPS}",
        # lr=inf passes validation and fails at run time: NaN losses, the guard stops the run
        "guard.on_repeated=stop",
        "guard.max_consecutive=2",
        "optim.lr=1e-3,2e-3,3e-3,inf",
    ]
    # The drill fires once per run directory: its marker, made here, keeps jobs 0 and 1 from
    # pausing (job 3 fails before step 6), so only job 2 is held.
    marker = "faults/step_6_rank0.json"
    for n in (0, 1):
        (root / f"sw-{n}" / "faults").mkdir(parents=True)
        (root / f"sw-{n}" / marker).write_text('{"pid": 0}\n')

    # 1. Submitted as a Ray job (the drill reaches every job's workers through the job's env).
    submit = Bg(
        [sys.executable, "-m", "cluster.submit", "--address", nodes.dashboard_url,
         "--stop-grace-s", "90", "--", "python", "-m", "trainer.train", "-m", *sweep,
         "cluster.address=auto"],
        tmp_path / "submit.log",
        driver_env(f"pause@step:6:hold={HOLD_S}"),
    )  # fmt: skip
    stopper = subprocess.Popen(
        [sys.executable, "-c", STOPPER, nodes.dashboard_url],
        env=driver_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert stopper.stdout.readline().strip() == "ready"
        job_id = wait_for(
            lambda: (m := re.search(r"^submitted (\S+):", submit.output, re.M)) and m.group(1),
            120,
            "the submission",
            submit,
        )
        wait_for((root / "sw-2" / marker).is_file, 900, "job 2 at step 6", submit)
        out, _ = stopper.communicate(job_id + "\n", timeout=120)  # `ray job stop <id>`
    finally:
        if stopper.poll() is None:
            stopper.kill()
    assert stopper.returncode == 0 and f"stopping {job_id} True" in out, out
    assert submit.wait(180) == 1
    out = submit.output
    assert re.search(r"SIGTERM: asking [12] running job\(s\) to checkpoint and stop", out), out

    js = jobs(d)
    assert [js[n]["status"] for n in range(3)] == ["finished", "finished", "stopped"], js
    # job 3 had failed (NaN losses from its second step) or was stopped while it started
    assert js[3]["status"] in ("failed", "stopped"), js[3]
    # job 2 checkpointed at the stop (a second SIGTERM would have ended it without one)
    s2 = json.loads((root / "sw-2" / "summary.json").read_text())
    assert js[2]["exit_code"] == 143 and s2["stopped_by"] == "SIGTERM", (js[2], s2)
    stopped_at = s2["final_step"]
    assert 6 <= stopped_at < STEPS
    assert (root / "sw-2" / f"checkpoint_{stopped_at:08d}").is_dir()
    done = {}
    for n in (0, 1):
        s = json.loads((root / f"sw-{n}" / "summary.json").read_text())
        assert s["finished"] and s["final_val_loss"] == js[n]["final_val_loss"]
        assert js[n]["tokens_per_sec"] > 0
        # the run trained inside its job's window (summary times: whole seconds)
        lo, hi = t(js[n]["started_at"]) - 1, t(js[n]["ended_at"]) + 1
        assert lo <= t(s["started_at"]) <= t(s["ended_at"]) <= hi
        assert "group: sweep-sw" in (root / f"sw-{n}" / "config.yaml").read_text()  # W&B
        done[n] = sha(root / f"sw-{n}" / "summary.json")

    # Two at a time; the next job starts as soon as any ends.
    w = {n: (t(j["started_at"]), t(j["ended_at"])) for n, j in js.items()}
    assert overlap(w[0], w[1]) and overlap(w[2], w[3]), w
    first, second = sorted([w[0][1], w[1][1]])
    assert first <= w[2][0] < first + 5 and second <= w[3][0] < second + 5, w
    for start, _ in w.values():
        assert sum(s <= start < e for s, e in w.values()) <= 2, w
    report = json.loads((d / "summary.json").read_text())
    total = sum(j["wall_s"] for j in js.values())
    print(f"sweep wall {report['wall_s']:.1f} s; sum of its 4 jobs' wall times {total:.1f} s")
    assert report["wall_s"] < 0.75 * total, (report["wall_s"], total)

    # 2. The same sweep again, here, against the cluster's address (where the cluster is
    #    reached from is no part of a sweep's definition): 0 and 1 skipped, 2 resumes, 3 fails.
    again = run_cli(
        "trainer.train", "-m", *sweep, f"cluster.address={nodes.address}", timeout=600,
        env=auth_env(),
    )  # fmt: skip
    out = again.stdout + again.stderr
    assert again.returncode == 1, out[-5000:]
    assert "4 job(s) validated, 2 already finished; running 2, 2 at a time" in out, out[-5000:]
    errors = error_lines(again)
    assert len(errors) == 1 and errors[0].startswith("error: sweep job 3 (sw-3: optim.lr=inf)")
    js = jobs(d)
    assert [js[n]["status"] for n in range(4)] == ["finished", "finished", "finished", "failed"]
    assert [js[n]["attempts"] for n in range(4)] == [1, 1, 2, 2]
    assert {n: sha(root / f"sw-{n}" / "summary.json") for n in (0, 1)} == done
    log = (d / "logs" / "sw-2.log").read_text().split("\n# ")[-1]  # its last attempt
    assert f"checkpoint_{stopped_at:08d} at step {stopped_at}" in log, log[-3000:]
    s2 = json.loads((root / "sw-2" / "summary.json").read_text())
    assert s2["finished"] and s2["final_step"] == STEPS
    report = json.loads((d / "summary.json").read_text())
    assert report["counts"] == {"finished": 3, "failed": 1}
    assert report["best"] in {"sw-0", "sw-1", "sw-2"}
    assert (d / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 3 | sw-3 | optim.lr=inf | failed |" in (d / "summary.md").read_text()
    assert "| job | run | overrides | status | final val loss | tokens/s |" in again.stdout
    assert {p.name for p in (d / "logs").iterdir()} == {f"sw-{n}.log" for n in range(4)}


def test_a_job_that_can_never_fit_the_joined_cluster_is_refused(tmp_path, smoke_data, nodes):
    # one CPU per node: a worker of 2 CPUs fits no node (a placement bundle never spans nodes)
    proc = run_cli(
        "trainer.train", "-m", *(o for o in QUICK if not o.startswith("cluster.cpus")),
        f"data.out_dir={smoke_data}", f"run.root={tmp_path}", f"cluster.address={nodes.address}",
        "cluster.cpus_per_worker=1,2", timeout=300,
        env=auth_env(),
    )  # fmt: skip
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = error_lines(proc)
    assert errors == [
        "error: sweep job 1 (sw-1: cluster.cpus_per_worker=2): one worker needs 2 CPUs and 0 "
        "GPUs on one node (cluster.cpus_per_worker, cluster.gpus_per_worker), but the largest "
        "Ray node has 1 CPUs and 0 GPUs"
    ], proc.stderr[-3000:]
    assert not any(tmp_path.iterdir())


def test_sigkill_of_the_sweep_takes_its_jobs_with_it(tmp_path, smoke_data, nodes):
    d = tmp_path / "sweep-sw"
    sweep = Bg(
        [sys.executable, "-m", "trainer.train", "-m", *QUICK, f"data.out_dir={smoke_data}",
         f"run.root={tmp_path}", f"cluster.address={nodes.address}", "trainer.max_steps=200",
         "optim.lr=1e-3,2e-3"],
        tmp_path / "sweep.log",
        driver_env(),
    )  # fmt: skip

    def running_pids() -> list[int]:
        js = jobs(d)
        pids = [j["pid"] for j in js.values() if j["status"] == "running" and j["pid"]]
        return pids if len(pids) == 2 else []

    pids = wait_for(running_pids, 300, "both jobs running", sweep)
    assert all(alive(p) for p in pids)
    os.kill(sweep.proc.pid, signal.SIGKILL)  # the sweep alone: its jobs have sessions of their own
    sweep.wait(60)
    for pid in pids:
        wait_for(lambda p=pid: not alive(p), 30, f"job process {pid} to die with the sweep")
    assert [j["status"] for j in jobs(d).values()] == ["running", "running"]  # resumable


@pytest.mark.drill  # make test-drills: a round of parallel jobs
def test_optuna_sweeper_runs_through_the_same_launcher(tmp_path, smoke_data, nodes):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_cli(
        "trainer.train", "-m", *QUICK, f"data.out_dir={smoke_data}", f"run.root={tmp_path}",
        f"cluster.address={nodes.address}", "trainer.max_steps=4", "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.seed=7",
        "optim.lr=interval(1e-4,1e-2)", timeout=600, env=auth_env(),
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    js = jobs(tmp_path / "sweep-sw")
    assert [js[n]["status"] for n in range(2)] == ["finished", "finished"], js
    lrs = [float(js[n]["label"].split("=")[1]) for n in range(2)]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and lrs[0] != lrs[1]
    result = (tmp_path / "sweep-sw" / "optimization_results.yaml").read_text()
    best = min(js[n]["final_val_loss"] for n in range(2))
    assert f"best_value: {best}" in result, result
    w = [(t(js[n]["started_at"]), t(js[n]["ended_at"])) for n in range(2)]
    assert overlap(w[0], w[1])  # one batch of 2 trials: both at once


def test_submit_of_a_bad_sweep_is_refused_here_in_one_line(tmp_path):
    proc = run_cli(
        "cluster.submit", "--address", "http://127.0.0.1:9", "--", "python", "-m",
        "trainer.train", "-m", *QUICK, f"run.root={tmp_path}", "model.n_head=4,3",
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert error_lines(proc) == [
        "error: sweep job 1 (sw-1: model.n_head=3): model: d_model (64) must be divisible by "
        "n_head (3)"
    ], proc.stderr
    assert "submitted" not in proc.stdout and not any(tmp_path.iterdir())
