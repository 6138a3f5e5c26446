"""data_pipeline/lease.py: one writer per run, prepare or sweep directory (issue 23).

The rules on a local path and on the moto S3 server: a fresh lease is taken and renewed; a held
one is refused in one line naming the holder; an expired one (old heartbeat, or a holder
process on this machine that is gone) is taken over; a released one is free again; of several
processes taking the same lease at once, exactly one wins.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data_pipeline import lease, storage
from data_pipeline.lease import Lease, LeaseHeld


def where(kind: str, tmp_path: Path, request) -> str:
    if kind == "local":
        return str(tmp_path / "runs" / "r" / lease.LEASE_FILE)
    s3 = request.getfixturevalue("s3")
    return storage.join(s3.unique_uri("lease"), lease.LEASE_FILE)


KINDS = ["local", "s3"]


def other_holder(uri: str, *, age_s: float, ttl: float = 60.0, **more) -> dict:
    """A lease record of a process on another machine, its last heartbeat age_s ago."""
    now = time.time()
    rec = {
        "what": "run 'r'",
        "token": "someone-else",
        "host": "node-7",
        "machine": "node-7/boot/1",
        "pid": 4242,
        "pid_start": "99",
        "since": now - age_s - 600,
        "heartbeat": now - age_s,
        "ttl_s": ttl,
        **more,
    }
    storage.write_text(uri, json.dumps(rec))
    return rec


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_lease_is_taken_renewed_and_released(kind, tmp_path, request):
    uri = where(kind, tmp_path, request)
    with Lease(uri, "run 'r'", ttl=2.0) as held:
        rec = json.loads(storage.read_text(uri))
        assert rec["pid"] == os.getpid() and rec["token"] == held.token
        assert rec["host"] and rec["since"] <= rec["heartbeat"] and rec["ttl_s"] == 2.0
        time.sleep(1.5)  # the heartbeat runs every ttl/4 = 0.5 s
        assert json.loads(storage.read_text(uri))["heartbeat"] > rec["heartbeat"]
        assert held.took_over is None and held.lost is None
    assert not storage.exists(uri)
    if kind == "local":  # the directory the lease created is gone with it
        assert not (tmp_path / "runs").exists()
    else:  # nor does an empty "directory" object stay in the bucket
        s3 = request.getfixturevalue("s3")
        folder = uri.split("/", 3)[3].rsplit("/", 1)[0]
        assert not s3.keys(folder), s3.keys(folder)
    with Lease(uri, "run 'r'"):  # free again
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_a_held_lease_is_refused_in_one_line_naming_its_holder(kind, tmp_path, request):
    uri = where(kind, tmp_path, request)
    t0 = time.time()
    first = Lease(uri, "run 'r'", ttl=60.0).acquire()
    try:
        before = storage.read_bytes(uri)
        with pytest.raises(LeaseHeld) as info:
            Lease(uri, "run 'r'", remedy="or stop it", ttl=60.0).acquire()
        line = str(info.value)
        assert "\n" not in line
        assert line.startswith(f"run 'r' is in use by host {os.uname().nodename} pid {os.getpid()}")
        # Ages in whole seconds, at most the time since the lease was taken (a slow store
        # under load takes seconds).
        waited = time.time() - t0 + 1
        age = int(re.search(r"heartbeat (\d+) s ago \(lease ", line)[1])
        assert age <= waited and f"(lease {uri})" in line, line
        assert "wait for it to end, or stop it" in line
        left = int(re.search(r"expires (\d+) s from now \(RAYGPT_LEASE_TTL_S=60\)", line)[1])
        assert 60 - waited <= left <= 60, line
        assert storage.read_bytes(uri) == before  # nothing written
    finally:
        first.release()

    # Another machine's holder, heartbeat 30 s old: alive (TTL 60 s), refused.
    other_holder(uri, age_s=30)
    with pytest.raises(LeaseHeld, match=r"host node-7 pid 4242 since .* heartbeat 3\d s ago"):
        Lease(uri, "run 'r'", ttl=60.0).acquire()


@pytest.mark.parametrize("kind", KINDS)
def test_an_expired_lease_is_taken_over(kind, tmp_path, request, capsys):
    uri = where(kind, tmp_path, request)
    old = other_holder(uri, age_s=90, ttl=60)
    with Lease(uri, "run 'r'", ttl=60.0) as held:
        assert held.took_over == old
        assert json.loads(storage.read_text(uri))["token"] == held.token
    err = capsys.readouterr().err
    assert "run 'r': took over the lease of host node-7 pid 4242" in err
    assert re.search(r"its heartbeat is 9\d s old \(TTL 60 s\)", err), err  # 90 s + the store's
    # The holder's own TTL counts when it is longer than ours: 90 s < 300 s, alive.
    other_holder(uri, age_s=90, ttl=300)
    with pytest.raises(LeaseHeld):
        Lease(uri, "run 'r'", ttl=60.0).acquire()


def test_a_holder_gone_from_this_machine_is_taken_over_at_once(tmp_path, capsys):
    """kill -9 of the holder on this machine: no wait for the TTL (its pid and start time no
    longer name a running process; a zombie counts as gone)."""
    uri = str(tmp_path / "r" / lease.LEASE_FILE)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from data_pipeline.lease import Lease; Lease({uri!r}, 'x')"
         ".acquire(); print('held', flush=True); import time; time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid} since"):
            Lease(uri, "run 'r'").acquire()
        holder.kill()
        time.sleep(0.5)  # not reaped yet: a zombie
        with Lease(uri, "run 'r'") as held:
            assert held.took_over["pid"] == holder.pid
        assert f"its process {holder.pid} on this machine is gone" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("state", ["fresh", "expired"])
def test_of_four_takers_of_one_lease_at_once_exactly_one_wins(kind, state, tmp_path, request):
    """Four takers (threads: each Lease is its own holder, with its own token) start together
    on no lease, or on an expired one; one holds it, three are refused naming it."""
    uri = where(kind, tmp_path, request)
    if state == "expired":
        other_holder(uri, age_s=600)
    gate = threading.Barrier(4)
    results: list[str] = []
    held: list[Lease] = []

    def take() -> None:
        mine = Lease(uri, "run 'r'", ttl=60.0)
        gate.wait()
        try:
            held.append(mine.acquire())
            results.append("held")
        except LeaseHeld:
            results.append("refused")

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert sorted(results) == ["held", "refused", "refused", "refused"], results
        assert json.loads(storage.read_text(uri))["token"] == held[0].token
    finally:
        for h in held:
            h.release()


def test_a_bad_ttl_setting_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv(lease.TTL_ENV, "soon")
    with pytest.raises(storage.StorageError, match=r"RAYGPT_LEASE_TTL_S \('soon'\) must be"):
        Lease(str(tmp_path / "x"), "run 'r'")
    monkeypatch.setenv(lease.TTL_ENV, "5")
    assert Lease(str(tmp_path / "x"), "run 'r'").ttl == 5.0


SMOKE = ["+experiment=smoke", "precision=fp32", "logging.mode=disabled"]


def errors_of(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_a_sweep_or_a_prepare_of_a_held_directory_is_refused_in_one_line(tmp_path, capsys):
    """The lease of a sweep directory and of a prepare's data.out_dir, held by a live process
    (this one): the command is refused with exit 2, one line naming the holder, nothing written
    (the lease is all the directory holds)."""
    from data_pipeline.prepare import main as prepare_main
    from trainer.train import main as train_main

    runs = tmp_path / "runs"
    holder = lease.dir_lease(str(runs / "sweep-sw"), "sweep 'sweep-sw'").acquire()
    try:
        rc = train_main(["-m", *SMOKE, f"run.root={runs}", "run.name=sw", "optim.lr=1e-3,2e-3"])
        errors = errors_of(capsys)
        assert rc == 2 and len(errors) == 1, errors
        assert f"sweep 'sweep-sw' ({runs / 'sweep-sw'}) is in use by host " in errors[0]
        assert f"pid {os.getpid()} since " in errors[0] and "choose another sweep.name" in errors[0]
        assert [p.name for p in runs.rglob("*")] == ["sweep-sw", lease.LEASE_FILE]
    finally:
        holder.release()

    out = tmp_path / "data"
    holder = lease.sibling_lease(str(out), "prepare").acquire()
    try:
        rc = prepare_main([f"data.out_dir={out}"])
        errors = errors_of(capsys)
        assert rc == 2 and len(errors) == 1, errors
        assert f"error: prepare of {out} is in use by host " in errors[0]
        assert "or use another data.out_dir" in errors[0]
        assert [p.name for p in tmp_path.iterdir()] == ["data.lease.json"]  # no out_dir
    finally:
        holder.release()
