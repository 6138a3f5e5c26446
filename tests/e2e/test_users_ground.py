"""The users' ground, for real: a two-node Ray cluster (tests/ray_nodes.py: two `ray start`
nodes of one CPU each, so the two workers always land on different nodes), a real
S3-compatible server (moto, tests/s3server.py; the nodes themselves have no S3 settings), real
DeepSpeed ZeRO-2 on CPU (gloo, fp32), W&B offline; run.root and data.out_dir on s3://.

One uninterrupted run (the outside driver, `python -m trainer.train cluster=ray
cluster.address=<head>`) is the reference for every other:
  a. it keeps the whole run contract in the bucket and nothing in a local `s3:` folder; the
     same command with more steps resumes from the bucket without repeating a step;
  c. `ray job stop` of a submitted job: raygpt checkpoints at the next stop decision within
     the job's stop grace (cluster/submit.py), and resubmitting resumes after it;
  b. that resubmitted job then loses node 2 (its raylet SIGKILLed while a fault drill holds
     rank 0 at step 11); Ray Train restarts the group on a replacement node 2, which resumes
     from the S3 checkpoint again: the reference's losses and samples, every sample once;
  d. a worker group the cluster can never hold is refused in one line before training.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from procs import Bg, wait_for
from ray_nodes import TwoNodes, _client, driver_env

from trainer.checkpoint.format import verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
RUN_TIMEOUT_S = 600
QUIET = "logging.mode=disabled"  # runs other than the reference: no W&B start-up
# make test-drills: two `ray start` nodes with S3 for every test here (each setup ~1-10 min on 2
# cores); make test keeps S3 (test_data_storage) and Ray Train runs on one node.
pytestmark = [pytest.mark.slow, pytest.mark.drill]


# -- runs ---------------------------------------------------------------------------------------
class Runs:
    """The module's runs: one S3 prefix, the cluster, a log folder."""

    def __init__(self, nodes, s3, logs: Path):
        self.nodes, self.s3, self.logs = nodes, s3, logs
        self.prefix = s3.unique_uri("users-ground")
        self.root, self.data = f"{self.prefix}/runs", f"{self.prefix}/data"
        self.t0 = time.time()

    def args(self, name: str, *extra: str, address: str | None = None) -> list[str]:
        return [
            "+experiment=smoke",
            "logging.mode=offline",
            "precision=fp32",
            "parallel=zero2",
            "cluster=ray",
            f"cluster.address={address or self.nodes.address}",
            "cluster.gpus_per_worker=0",
            "cluster.cpus_per_worker=1",
            "cluster.num_workers=2",
            "cluster.max_failures=3",
            f"trainer.max_steps={STEPS}",
            "trainer.checkpoint_interval=4",
            "trainer.log_sample_ids=true",
            "trainer.eval_interval=0",  # the final eval still runs (eval.jsonl)
            "trainer.sample_tokens=0",
            "trainer.peak_flops=1e11",  # not measured in every worker
            f"data.out_dir={self.data}",
            f"run.root={self.root}",
            f"run.name={name}",
            *extra,
        ]

    def train(self, name: str, *extra: str, fault: str | None = None) -> Bg:
        """`python -m trainer.train` here, joining the cluster from outside."""
        cmd = [sys.executable, "-m", "trainer.train", *self.args(name, *extra)]
        return Bg(cmd, self.logs / f"{name}-{time.monotonic_ns()}.log", driver_env(fault))

    def submit(self, name: str, *extra: str, fault: str | None = None) -> Bg:
        """`python -m cluster.submit` (follows the job's logs until it ends)."""
        cmd = [
            sys.executable, "-m", "cluster.submit", "--address", self.nodes.dashboard_url,
            *self.args(name, *extra, address="auto"),
        ]  # fmt: skip
        return Bg(cmd, self.logs / f"{name}-job-{time.monotonic_ns()}.log", driver_env(fault))

    # -- the bucket -----------------------------------------------------------------------------
    def key(self, name: str, rel: str = "") -> str:
        base = self.root.split("://", 1)[1].split("/", 1)[1]
        return f"{base}/{name}/{rel}" if rel else f"{base}/{name}"

    def uri(self, name: str, rel: str = "") -> str:
        return f"{self.root}/{name}/{rel}" if rel else f"{self.root}/{name}"

    def keys(self, name: str) -> list[str]:
        base = self.key(name) + "/"
        return [k[len(base) :] for k in self.s3.keys(base)]

    def read(self, name: str, rel: str) -> str:
        return self.s3.read(self.key(name, rel)).decode()

    def jsonl(self, name: str, rel: str) -> list[dict]:
        return [json.loads(ln) for ln in self.read(name, rel).splitlines() if ln.strip()]

    def losses(self, name: str) -> dict[int, float]:
        """step -> loss (a restarted attempt logs the steps after its checkpoint again: the
        last record wins)."""
        return {r["step"]: r["loss"] for r in self.jsonl(name, "metrics.jsonl")}

    def samples(self, name: str) -> dict[int, list[int]]:
        """step -> the global sample ids of that step, all ranks (the last record of a step
        and data-parallel rank counts)."""
        last: dict[tuple[int, int], list[int]] = {}
        for rel in self.keys(name):
            if re.fullmatch(r"samples/rank_\d+\.jsonl", rel):
                for r in self.jsonl(name, rel):
                    last[(r["step"], r["dp_rank"])] = r["ids"]
        out: dict[int, list[int]] = {}
        for (step, _), ids in sorted(last.items()):
            out.setdefault(step, []).extend(ids)
        return {s: sorted(ids) for s, ids in out.items()}

    def latest(self, name: str) -> str | None:
        """The newest checkpoint the run's index registers (trainer/checkpoint/index.py)."""
        names = [c["name"] for c in json.loads(self.read(name, "checkpoints.json"))["checkpoints"]]
        return names[-1] if names else None

    def latest_or_none(self, name: str) -> str | None:
        """latest(), or None while the index is not there yet."""
        try:
            return self.latest(name)
        except Exception:  # noqa: BLE001 - not yet written
            return None

    # -- the cluster ----------------------------------------------------------------------------
    def worker_actors(self) -> dict[str, dict]:
        return {a["actor_id"]: a for a in self.nodes.actors("RayTrainWorker")}

    def session_pids(self) -> set[int]:
        return {p for n in self.nodes.nodes for p in n.session_pids()}


def fault_marker_pid(runs: Runs, point: str, step: int, rank: int, since: float) -> int | None:
    """The pid a fault drill wrote into its marker. On object storage the marker lies in the
    worker's local staging dir of run files (a temp dir of the worker's node)."""
    rel = f"faults/{point}_{step}_rank{rank}.json"
    for d in {tempfile.gettempdir(), "/tmp"}:
        for marker in Path(d).glob(f"raygpt-run-rank{rank}-*/{rel}"):
            try:
                if marker.stat().st_mtime < since:
                    continue
                pid = json.loads(marker.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue
            if pid in runs.session_pids():
                return pid
    return None


def s3_folders(roots: list[Path], since: float) -> list[str]:
    """Directories named `s3:` (an s3:// URI taken for a local path) made since `since`."""
    found = []
    for root in roots:
        for dirpath, dirnames, _ in os.walk(root, onerror=lambda e: None):
            dirnames[:] = [d for d in dirnames if d not in (".venv", ".git")]
            for d in dirnames:
                p = Path(dirpath) / d
                try:
                    if d.startswith("s3:") and p.stat().st_mtime >= since:
                        found.append(str(p))
                except OSError:
                    continue
    return found


def assert_same_losses(got: dict[int, float], ref: dict[int, float]) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert math.isclose(got[step], ref[step], rel_tol=1e-6), (step, got[step], ref[step])


def assert_exactly_once(got: dict[int, list[int]], ref: dict[int, list[int]]) -> None:
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == ref
    every = [i for ids in got.values() for i in ids]
    assert len(every) == len(set(every)) == STEPS * 8  # global batch 8, no sample twice


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(s3):
    """The two nodes, with credentials of their own for the bucket (an instance role's, on a
    real cluster) but not the endpoint or region: raygpt hands those on from the driver or
    the submitting machine (data_pipeline.storage.remote_env, cluster/submit.py)."""
    creds = {k: s3.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    with TwoNodes.start(extra_env=creds) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def runs(cluster, s3, tmp_path_factory):
    return Runs(cluster, s3, tmp_path_factory.mktemp("users-ground-logs"))


@pytest.fixture(scope="module")
def reference(runs):
    """The uninterrupted run (outside driver); its first invocation also prepares the data
    into the bucket. Returns (losses, samples, worker actors, output, seconds)."""
    before = runs.worker_actors()
    run = runs.train("ref")
    rc = run.wait()
    assert rc == 0, run.output[-4000:]
    workers = {k: v for k, v in runs.worker_actors().items() if k not in before}
    return runs.losses("ref"), runs.samples("ref"), workers, run.output, run.seconds


# -- a ------------------------------------------------------------------------------------------
@pytest.mark.timeout(1200)
def test_a_s3_run_on_two_nodes_keeps_the_run_contract_and_resumes(runs, reference):
    ref_loss, ref_ids, workers, _, _ = reference
    # The two workers ran on the two nodes.
    assert len(workers) == 2, workers
    nodes = {w["node_id"] for w in workers.values()}
    assert len(nodes) == 2 and nodes <= set(runs.nodes.alive_node_ids()), workers

    # The run contract, in the bucket.
    keys = set(runs.keys("ref"))
    for rel in ("config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json", "loss.png",
                "memory/rank_0.json", "memory/rank_1.json", "samples/rank_0.jsonl",
                "samples/rank_1.jsonl", "checkpoints.json"):  # fmt: skip
        assert rel in keys, (rel, sorted(keys))
    assert any(k.startswith("wandb/offline-run-") for k in keys), sorted(keys)
    ckpts = sorted({k.split("/")[0] for k in keys if k.startswith("checkpoint_0")})
    assert ckpts == ["checkpoint_00000008", "checkpoint_00000012"], ckpts  # keep_last 2
    for name in ckpts:
        assert f"{name}/trainer_state.json" in keys
        verify_checkpoint(runs.uri("ref", name))  # every rank's files, sizes and hashes
    assert runs.latest("ref") == "checkpoint_00000012"
    summary = json.loads(runs.read("ref", "summary.json"))
    assert summary["finished"] and summary["final_step"] == STEPS
    assert [r["step"] for r in runs.jsonl("ref", "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert_exactly_once(ref_ids, ref_ids)

    # The same command with more steps resumes from the bucket: no step repeated.
    more = runs.train("ref", "trainer.max_steps=16")
    assert more.wait() == 0, more.output[-4000:]
    assert "checkpoint_00000012 at step 12" in more.output, more.output[-4000:]
    steps = [r["step"] for r in runs.jsonl("ref", "metrics.jsonl")]
    assert steps == list(range(1, 17)), steps
    assert {s: ref_loss[s] for s in range(1, STEPS + 1)} == {
        s: v for s, v in runs.losses("ref").items() if s <= STEPS
    }
    assert runs.latest("ref") == "checkpoint_00000016"

    # Nothing went to a local folder named `s3:` (cwd, temp dirs, Ray's temp dirs).
    roots = [ROOT, Path(tempfile.gettempdir()), Path("/tmp"), Path.home() / "ray_results"]
    roots += [Path(d) for d in runs.nodes.temp_dirs()]
    assert s3_folders(roots, runs.t0) == []


# -- b + c --------------------------------------------------------------------------------------
def job_id(bg: Bg) -> str | None:
    m = re.search(r"^submitted (\S+):", bg.output, re.M)
    return m.group(1) if m else None


@pytest.mark.timeout(1800)
def test_bc_job_stop_checkpoints_then_a_lost_node_resumes_from_s3(runs, reference):
    """c, then b on the resubmitted job (one job fewer than two separate scenarios)."""
    ref_loss, ref_ids, *_ = reference
    # c. `ray job stop` while rank 0 is held at step 6: SIGTERM reaches the driver; the workers
    #    checkpoint at the next stop decision (trainer/worker/control.py: after step 6 with
    #    gloo, by step 10 where decisions are every EVERY_STEPS steps) and the driver writes
    #    the summary, within the job's stop grace (cluster/submit.py); Ray's default grace (3 s)
    #    would have SIGKILLed it while rank 0 was still held.
    t0 = time.time()
    job = runs.submit("job", QUIET, fault="pause@step:6:rank=0:hold=15")
    try:
        jid = wait_for(lambda: job_id(job), 120, "the job id", job)
        wait_for(lambda: fault_marker_pid(runs, "step", 6, 0, t0), 600, "step 6", job)
        t_stop = time.monotonic()
        stop = subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "job", "stop", "--address",
             runs.nodes.dashboard_url, jid],
            env=driver_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert stop.returncode == 0, stop.stdout + stop.stderr
        rc = job.wait()
        stop_s = time.monotonic() - t_stop
    finally:
        job.stop()
    out = job.output
    assert rc == 1 and f"job {jid}: STOPPED" in out, out[-4000:]
    m = re.search(r"^stopped at step (\d+) \(SIGTERM\)", out, re.M)
    assert m, out[-4000:]
    at = int(m.group(1))
    assert 6 <= at <= 10, at
    ckpt = f"checkpoint_{at:08d}"
    assert runs.latest("job") == ckpt  # registered: what a resubmitted job resumes from
    verify_checkpoint(runs.uri("job", ckpt))
    summary = json.loads(runs.read("job", "summary.json"))
    assert summary["stopped_by"] == "SIGTERM" and summary["final_step"] == at
    assert not summary["finished"]
    steps = [r["step"] for r in runs.jsonl("job", "metrics.jsonl")]
    assert steps == list(range(1, at + 1)), steps

    # Resubmitting resumes after that checkpoint. b: while rank 0 is held at step 11, node 2's
    # raylet is SIGKILLed; a replacement node joins and Ray Train restarts the group, which
    # resumes from the same checkpoint in the bucket again. On object storage the drill fires again
    # in the restarted attempt (its marker lives in the worker's fresh local staging dir:
    # trainer/worker/faults.py), hence a short hold.
    before = runs.worker_actors()
    old_nodes = set(runs.nodes.alive_node_ids())
    t1 = time.time()
    again = runs.submit("job", QUIET, fault="pause@step:11:rank=0:hold=10")
    try:
        wait_for(lambda: fault_marker_pid(runs, "step", 11, 0, t1), 600, "step 11", again)
        killed = runs.nodes.kill_second_raylet()
        runs.nodes.restart_second()
        rc = again.wait()
    finally:
        again.stop()
    out = again.output
    assert rc == 0, out[-4000:]
    # Resumed from the stop checkpoint (the first group's line too, unless rank 0 ran on the
    # lost node: a node's log monitor dies with it, and lines not yet forwarded are lost).
    assert f"{ckpt} at step {at}" in out, out[-4000:]
    # Neither group of the resubmitted job started over: its rows begin after the stop step.
    steps = [r["step"] for r in runs.jsonl("job", "metrics.jsonl")]
    assert steps[:at] == list(range(1, at + 1)) and min(steps[at:]) == at + 1, steps
    assert_same_losses(runs.losses("job"), ref_loss)  # the last record of a step counts
    assert_exactly_once(runs.samples("job"), ref_ids)
    # Two worker groups: on the head and the lost node, then on the head and its replacement.
    workers = [w for k, w in runs.worker_actors().items() if k not in before]
    assert len(workers) == 4, workers
    used = {w["node_id"] for w in workers}
    new_nodes = set(runs.nodes.alive_node_ids()) - old_nodes
    assert len(used) == 3 and len(new_nodes) == 1 and new_nodes <= used, (workers, new_nodes)
    print(f"c: stop took {stop_s:.1f} s; b: raylet {killed} killed, job {again.seconds:.0f} s")


# -- d ------------------------------------------------------------------------------------------
_CAPACITY = """
import json, sys
import ray
ray.init(address=sys.argv[1], logging_level="WARNING")
from cluster import ray_private
print(json.dumps({"max": ray_private.max_resources(), "now": ray_private.current_resources()}))
"""


@pytest.mark.timeout(600)
def test_d_a_group_the_cluster_cannot_hold_is_refused_before_training(runs):
    seen = _client(runs.nodes.env, _CAPACITY, runs.nodes.address)
    assert seen["max"] is None  # `ray start` nodes: the read-only autoscaler adds none
    assert seen["now"]["CPU"] == 2.0
    run = runs.train("too-big", "cluster.num_workers=4", "trainer.micro_batch_size=2")
    assert run.wait() == 2, run.output[-4000:]
    errors = [ln for ln in run.output.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: cluster.num_workers (4) needs 4 CPUs and 0 GPUs, but the Ray cluster has 2 CPUs "
        "and 0 GPUs"
    ], run.output[-3000:]
    assert not runs.keys("too-big")  # refused before anything was written
