"""A prepare killed with SIGKILL at any point resumes when the same command runs again and ends
byte-identical (every shard, tokenizer.json and manifest.json) to a run never interrupted.

Real processes (`python -m data_pipeline.prepare`), real Ray (each run starts its own), real
Parquet, JSONL and text sources. The kill points are the drills of data_pipeline/prepare.py:
RAYGPT_PREPARE_KILL makes the driver SIGKILL itself after listing (plan in the ledger), after
the tokenizer, after the first task of the run is done (twice: more tasks each time), after all
tasks (before the manifest) and after the manifest (before the commit's rename);
RAYGPT_PREPARE_KILL_TASK makes one task SIGKILL its worker process after its first shard (Ray
runs it again). Each run is started in a session of its own; Ray daemons left behind by a
killed driver are stopped by their PIDs (in that session).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from procs import ROOT, tree_digest

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two Parquet files of 3 row groups, a JSONL file with CRLF lines (cut into byte ranges
    by the small task memory budget below) and a few text files."""
    src = tmp_path_factory.mktemp("corpus")
    rng = random.Random(5)
    vocab = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7)))
             for _ in range(300)]  # fmt: skip

    def doc(n: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(n))

    for f in range(2):
        table = pa.table({"text": [doc(rng.randint(20, 120)) for _ in range(240)]})
        pq.write_table(table, src / f"p{f}.parquet", row_group_size=80)
    with open(src / "big.jsonl", "w", newline="") as fh:
        for i in range(700):
            fh.write(json.dumps({"text": doc(rng.randint(20, 100))}) + ("\r\n" if i % 7 else "\n"))
    for i in range(6):
        (src / f"t{i}.txt").write_text(doc(300))
    return src


def args(corpus: Path, out: Path) -> list[str]:
    return [
        "data=parquet", f"data.sources=[{corpus}]", f"data.out_dir={out}",
        "data.vocab_size=300", "data.seq_len=32", "data.num_tasks=6",
        "data.task_memory_bytes=262144", "data.samples_per_shard=2000",
    ]  # fmt: skip


def run_prepare(argv: list[str], log: Path, **env: str) -> int:
    """`python -m data_pipeline.prepare argv` in a session of its own; returns its exit status
    (-9: killed by a drill) once no process of that session is left."""
    full = {**os.environ, **env}
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "data_pipeline.prepare", *argv],
            cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    _reap_session(proc.pid)
    return rc


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # session id; not a zombie
                pids.append(int(entry.name))
    return pids


def _reap_session(sid: int) -> None:
    """Ray daemons a killed driver left in its session: they get 10 s to go, then SIGKILL."""
    deadline = time.monotonic() + 10
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def digests(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory) -> dict[str, str]:
    """The files of an uninterrupted prepare."""
    out = tmp_path_factory.mktemp("ref") / "data"
    log = out.parent / "log.txt"
    assert run_prepare(args(corpus, out), log) == 0, log.read_text()[-3000:]
    files = digests(out)
    shards = [n for n in files if n.endswith(".parquet")]
    assert "manifest.json" in files and "tokenizer.json" in files and len(shards) >= 7
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stats"]["num_tasks"] == 6 and "created" not in manifest
    assert {s["file"]: s["sha256"] for sp in manifest["splits"].values() for s in sp["shards"]} == {
        n: files[n] for n in shards
    }
    return files


def ledger_of(out: Path) -> tuple[Path, list[str]]:
    [build] = list(out.parent.glob(f"{out.name}.partial-*"))
    ledger = build / "ledger"
    return build, sorted(p.name for p in ledger.iterdir()) if ledger.is_dir() else []


def test_driver_killed_at_each_point_resumes_byte_identical(
    corpus: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "data"
    log = tmp_path / "log.txt"
    done_before = 0
    for point in ("listed", "tokenizer", "task", "task", "tasks", "manifest"):
        rc = run_prepare(args(corpus, out), log, RAYGPT_PREPARE_KILL=point)
        assert rc == -signal.SIGKILL, (point, log.read_text()[-3000:])
        assert not out.exists(), point  # nothing committed
        build, ledger = ledger_of(out)
        tasks = [n for n in ledger if n.startswith("task-")]
        assert "plan.json" in ledger, point
        if point == "listed":
            assert not (build / "tokenizer.json").exists() and not tasks
            # an unfinished prepare of other settings is in the way: one line, nothing changed
            before = tree_digest(tmp_path)
            other = [*args(corpus, out), "data.seq_len=16"]
            assert run_prepare(other, tmp_path / "other.txt") == 2
            errors = [ln for ln in (tmp_path / "other.txt").read_text().splitlines()
                      if ln.startswith("error:")]  # fmt: skip
            assert len(errors) == 1
            assert "holds the ledger of an unfinished prepare with other settings" in errors[0]
            assert "(changed: seq_len)" in errors[0] and str(build) in errors[0]
            (tmp_path / "other.txt").unlink()
            assert tree_digest(tmp_path) == before
        if point == "tokenizer":
            assert (build / "tokenizer.json").exists() and not tasks
        if point == "task":  # some tasks done, more than the run before
            assert len(tasks) > done_before
        if point == "tasks":
            assert len(tasks) == 6 and not (build / "manifest.json").exists()
        if point == "manifest":
            assert (build / "manifest.json").exists()
        done_before = len(tasks)
    assert run_prepare(args(corpus, out), log) == 0, log.read_text()[-3000:]
    assert digests(out) == reference
    assert not list(tmp_path.glob("data.partial-*"))
    assert "already done (ledger)" in log.read_text()


@pytest.mark.drill  # make test-drills (make test kills the driver at every point)
def test_a_killed_task_process_is_run_again_byte_identical(
    corpus: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "data"
    log = tmp_path / "log.txt"
    marker = tmp_path / "killed-task-2"
    rc = run_prepare(args(corpus, out), log, RAYGPT_PREPARE_KILL_TASK=f"2:{marker}")
    assert rc == 0, log.read_text()[-3000:]
    assert marker.exists()  # task 2's worker was SIGKILLed (after its first shard)
    assert digests(out) == reference
    assert not list(tmp_path.glob("data.partial-*"))


@pytest.mark.drill  # make test-drills: the same kills on moto S3
def test_on_object_storage_a_killed_prepare_resumes_byte_identical(
    corpus: Path, reference: dict[str, str], tmp_path: Path, s3
) -> None:
    """data.out_dir on a real S3-compatible server (moto): the driver killed with some tasks
    done, then after manifest.json (the commit) but before the ledger is deleted; the reruns
    finish the same files (the manifest names them under the version prefix) and tidy up."""
    uri = s3.unique_uri("resume")
    prefix = uri.split("/", 3)[3]
    log = tmp_path / "log.txt"
    assert run_prepare(args(corpus, uri), log, RAYGPT_PREPARE_KILL="task") == -signal.SIGKILL
    keys = s3.keys(prefix + "/")
    assert f"{prefix}/manifest.json" not in keys
    [version] = {k.split("/")[1] for k in keys if k.split("/")[1].startswith("v-")}
    assert any(k.startswith(f"{prefix}/{version}/ledger/task-") for k in keys)
    assert run_prepare(args(corpus, uri), log, RAYGPT_PREPARE_KILL="manifest") == -signal.SIGKILL
    assert f"{prefix}/manifest.json" in s3.keys(prefix + "/")  # committed, ledger still there
    assert run_prepare(args(corpus, uri), log) == 0, log.read_text()[-3000:]
    assert "already done (ledger)" in log.read_text()
    got = {}
    for key in s3.keys(prefix + "/"):
        if key.endswith("/"):
            continue  # the empty "dir/" markers pyarrow leaves after deleting objects
        name = key[len(prefix) + 1 :].removeprefix(f"{version}/")
        data = s3.read(key)
        if name == "manifest.json":  # its file names carry the version prefix
            data = data.replace(f"{version}/".encode(), b"")
        got[name] = hashlib.sha256(data).hexdigest()
    assert got == reference  # no ledger left, every file the same bytes
