"""Helpers for tests that run raygpt's command lines as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from procs import tree_digest  # noqa: F401 - the e2e tests import it from here

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m <args>` from the repo root, with `env` added to this environment."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
