"""Runs a script that builds DeepSpeed engines in child processes (gloo, one process per rank),
so no process group is left behind in the test session; returns their RESULT lines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_single_process(script: str, *args: str, timeout: float) -> Any:
    """`script` prints one line "RESULT <json>"; that JSON, after a zero exit."""
    return run_ranks(script, *args, world=1, timeout=timeout)[0]


def run_ranks(script: str, *args: str, world: int, timeout: float) -> list[Any]:
    """`script` in `world` processes at once (RANK 0..world-1 of one process group, one
    torch thread each unless the script sets more); each prints one line "RESULT <json>".
    Those JSONs by rank, after every process exited with 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    for rank in range(world):
        env = {
            **os.environ,
            "DS_ACCELERATOR": "cpu",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
        }
        # files, not pipes: a rank blocked on a full pipe would stall its peers' collectives
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        logs.append((out, err))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, *args], cwd=ROOT, env=env, stdout=out, stderr=err
            )
        )
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        results = []
        for proc, (out, err) in zip(procs, logs):
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
            result = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
            assert proc.returncode == 0 and result, stdout[-3000:] + stderr[-3000:]
            results.append(json.loads(result[0][len("RESULT ") :]))
        return results
    finally:
        for proc, (out, err) in zip(procs, logs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()
