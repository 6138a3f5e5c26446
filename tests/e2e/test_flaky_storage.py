"""Flaky object storage survived: a fault-injecting proxy (tests/faulty_proxy.py) in front of
the real S3-compatible server (moto, tests/s3server.py) answers a set fraction of requests with
503 SlowDown or 500, resets connections mid-body and holds requests past the client's timeout.

make test keeps the small case (storage.py's operations, the start-up probe and the loader's
ranged reads through ~25% faults, and a store that stays down); the drills (make test-drills)
run a prepare, a training run with checkpoints and metrics on S3, a kill -9 and its resume, and
an export through the faults and compare them byte for byte with the same work without them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from faulty_proxy import faulty_proxy
from synthetic_shards import SHARD_ROWS, expected_row, write_dataset

from data_pipeline import storage
from data_pipeline.loader import TokenShards
from data_pipeline.storage import StorageConfig, StorageError

pytestmark = pytest.mark.slow

# Sized for a test: the proxy holds a "delay" request 1.5 s, past the 1 s request timeout.
QUICK = StorageConfig(
    request_attempts=4, op_attempts=4, base_delay_s=0.1, max_delay_s=1.0,
    connect_timeout_s=1.0, request_timeout_s=1.0,
)  # fmt: skip


@pytest.fixture
def quick_policy(monkeypatch):
    monkeypatch.setenv(storage.POLICY_VAR, "")
    storage.configure(QUICK)
    return QUICK


def unfinished_uploads(s3) -> list:
    return s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])


def test_storage_probe_and_loader_reads_survive_a_flaky_store(s3, quick_policy, tmp_path):
    root = write_dataset(tmp_path / "ds", SHARD_ROWS, row_group=3)
    prefix = s3.unique_uri("flaky")
    key = prefix.split("/", 3)[3]
    for f in root.iterdir():  # straight to the server
        s3.client().upload_file(str(f), s3.bucket, f"{key}/ds/{f.name}")
    small, big = os.urandom(3000), os.urandom(12 << 20)  # big: a multipart upload
    with faulty_proxy(s3, fraction=0.25, seed=3, delay_s=1.5) as proxy:
        for i in range(6):
            storage.write_bytes(f"{prefix}/obj{i}", small)
            assert storage.read_bytes(f"{prefix}/obj{i}") == small
        storage.write_bytes(f"{prefix}/big", big)
        storage.check_writable(f"{prefix}/run", "run.root")
        shards = TokenShards(f"{prefix}/ds", "train", read_threads=2)
        ids = np.arange(sum(SHARD_ROWS))
        got = shards.get_batch(ids)
        shards.close()
        report = proxy.report()
    np.testing.assert_array_equal(got, np.stack([expected_row(i) for i in ids]))
    assert s3.read(f"{key}/big") == big
    assert sum(r["injected"] for r in report.values()) >= 10, report
    for kind, r in report.items():  # every fault was tried again and got through
        assert r["retried"] == r["survived"] == r["injected"], (kind, report)
    # the probe cleaned up after itself; no unfinished upload was left
    assert not [k for k in s3.keys(key) if ".raygpt-probe" in k]
    assert not [u for u in unfinished_uploads(s3) if u["Key"].startswith(key)]


@pytest.mark.drill  # ~25 s: make test keeps the flaky case above
def test_a_store_that_stays_down_is_one_line_naming_the_code(s3, monkeypatch):
    monkeypatch.setenv(storage.POLICY_VAR, "")
    storage.configure(StorageConfig(request_attempts=2, op_attempts=2, base_delay_s=0.1))
    prefix = s3.unique_uri("down")
    key = prefix.split("/", 3)[3]
    s3.client().put_object(Bucket=s3.bucket, Key=f"{key}/x", Body=b"x")
    with faulty_proxy(s3) as proxy:
        proxy.pause()  # every request: 503 SlowDown
        with pytest.raises(StorageError) as read:
            storage.read_bytes(f"{prefix}/x")
        with pytest.raises(StorageError) as probe:
            storage.check_writable(f"{prefix}/run", "run.root")
        with pytest.raises(StorageError) as write:
            storage.write_bytes(f"{prefix}/big", os.urandom(12 << 20))
    for e in (read.value, probe.value, write.value):
        msg = str(e)
        assert "\n" not in msg and "SLOW_DOWN" in msg or "HTTP 503" in msg, msg
        assert "retry later" in msg, msg
    # throttling is not "not writable", nor "does not exist"
    assert "not writable" not in str(probe.value) and "does not exist" not in str(read.value)
    assert str(probe.value).startswith(f"run.root ({prefix}/run): ")
    assert s3.keys(key) == [f"{key}/x"]  # no probe, no half object
    assert not [u for u in unfinished_uploads(s3) if u["Key"].startswith(key)]


# ---------------------------------------------------------------------------- the drill: runs
STEPS = 8
POLICY = [  # the proxy holds "delay" requests 3 s: past this 2 s request timeout
    "storage.request_timeout_s=2", "storage.base_delay_s=0.2", "storage.max_delay_s=2",
]  # fmt: skip


def train_args(root: str, data: str, name: str) -> list[str]:
    return [
        "+experiment=smoke", "logging.mode=disabled", "precision=fp32", "parallel=zero2",
        "cluster.num_workers=1", "trainer.global_batch_size=4", f"trainer.max_steps={STEPS}",
        "trainer.checkpoint_interval=2", "trainer.eval_interval=4", "trainer.sample_tokens=0",
        f"data.out_dir={data}", f"run.root={root}", f"run.name={name}", *POLICY,
    ]  # fmt: skip


def objects(s3, prefix: str) -> dict[str, bytes]:
    """key (relative to prefix) -> bytes of every object under it (not directory markers)."""
    base = prefix.split("/", 3)[3] + "/"
    return {k[len(base) :]: s3.read(k) for k in s3.keys(base) if not k.endswith("/")}


def metrics(s3, run_uri: str) -> list[dict]:
    import json

    raw = objects(s3, run_uri).get("metrics.jsonl", b"").decode()
    return [json.loads(ln) for ln in raw.splitlines() if ln.strip()]


def tree_bytes(root) -> dict[str, bytes]:
    from pathlib import Path

    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


@pytest.mark.drill  # several minutes: two prepares, three trainings and two exports on 2 cores
@pytest.mark.timeout(1800)
def test_prepare_train_kill_resume_and_export_through_a_flaky_store(s3, tmp_path):
    import signal
    import time

    from cli_helpers import run_cli
    from procs import wait_for
    from test_interruptions import Run

    prefix = s3.unique_uri("flaky-drill")
    ref_data, ref_root = f"{prefix}/ref/data", f"{prefix}/ref/runs"
    data, root = f"{prefix}/flaky/data", f"{prefix}/flaky/runs"

    # The same work without faults.
    ref_prep = run_cli("data_pipeline.prepare", "+experiment=smoke", f"data.out_dir={ref_data}")
    assert ref_prep.returncode == 0, ref_prep.stderr[-3000:]
    ref = Run(train_args(ref_root, ref_data, "r"), tmp_path / "ref.log")
    assert ref.wait(900) == 0, ref.output[-3000:]
    out = run_cli("trainer.export", f"{ref_root}/r", str(tmp_path / "ref-export"))
    assert out.returncode == 0, out.stderr[-3000:]

    with faulty_proxy(s3, fraction=0.1, seed=7, delay_s=3.0) as proxy:
        prep = run_cli(
            "data_pipeline.prepare", "+experiment=smoke", f"data.out_dir={data}", *POLICY,
            timeout=900,
        )  # fmt: skip
        assert prep.returncode == 0, prep.stderr[-3000:]
        first = Run(train_args(root, data, "f"), tmp_path / "first.log")
        wait_for(
            lambda: len(metrics(s3, f"{root}/f")) >= 5 or first.proc.poll() is not None,
            900, "step 5", first, poll_s=2,
        )  # fmt: skip
        first.proc.send_signal(signal.SIGKILL)
        first.wait()
        time.sleep(1)
        second = Run(train_args(root, data, "f"), tmp_path / "second.log")
        assert second.wait(900) == 0, second.output[-3000:]
        assert "resumed from" in second.output, second.output[-3000:]
        exp = run_cli("trainer.export", f"{root}/f", str(tmp_path / "export"), timeout=900)
        assert exp.returncode == 0, exp.stderr[-3000:]
        report = proxy.report()
        requests = proxy.requests

    print(f"\n{requests} requests through the proxy; faults: {report}")
    assert sum(r["injected"] for r in report.values()) >= 20, report
    # prepare: byte-identical shards, tokenizer and manifest
    assert objects(s3, data) == objects(s3, ref_data)
    # training: the losses of every step, each step logged once (the resume set aside the rows
    # after its checkpoint into rewound-<n>/, trainer/worker/observability/run_files.py)
    want = {r["step"]: r["loss"] for r in metrics(s3, f"{ref_root}/r") if "loss" in r}
    rows = [r for r in metrics(s3, f"{root}/f") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert {r["step"]: r["loss"] for r in rows} == want
    # export: the same files, byte for byte
    assert tree_bytes(tmp_path / "export") == tree_bytes(tmp_path / "ref-export")
    # nothing unfinished left in the bucket
    key = prefix.split("/", 3)[3]
    assert not [u for u in unfinished_uploads(s3) if u["Key"].startswith(key)]
    assert not [k for k in s3.keys(key) if ".raygpt-probe" in k]
    for log in ("first.log", "second.log"):  # the SDK's retries stay off the console
        text = (tmp_path / log).read_text()
        assert "SLOW_DOWN" not in text and "Traceback" not in text, text[-3000:]


@pytest.mark.drill
def test_a_store_down_for_the_whole_budget_stops_prepare_with_one_line(s3):
    from cli_helpers import error_lines, run_cli

    data = s3.unique_uri("down-prepare") + "/data"
    with faulty_proxy(s3) as proxy:
        proxy.pause()
        proc = run_cli(
            "data_pipeline.prepare", "+experiment=smoke", f"data.out_dir={data}",
            "storage.request_attempts=2", "storage.op_attempts=2", "storage.base_delay_s=0.1",
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert data in lines[0] and ("SLOW_DOWN" in lines[0] or "HTTP 503" in lines[0]), lines
    assert "not writable" not in lines[0] and "retry later" in lines[0], lines
    assert s3.keys(data.split("/", 3)[3]) == []  # nothing registered, nothing half-written
