"""Helpers the e2e and unit tests share: a command in the background with its output in a
file, waiting for a condition while watching that command, and a digest of a directory tree
(equal digests: nothing under it was created, changed or removed)."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Bg:
    """A command of the test's own in the background (cwd: the repository); output to `log`."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]):
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 - closed in wait() / stop()
        self.t0 = time.monotonic()
        self.seconds: Optional[float] = None
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT
        )

    def wait(self, timeout: float = 600.0) -> int:
        """The exit status; a command still running after `timeout` s is killed and fails
        the test with the end of its output."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            pytest.fail(f"timed out after {timeout} s:\n{self.output[-4000:]}")
        finally:
            self._out.close()
            self.seconds = time.monotonic() - self.t0

    def stop(self) -> None:
        """SIGKILL if still running (this process only: the test started it)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._out.close()

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for(predicate, timeout: float, what: str, bg: Any = None, poll_s: float = 0.2):
    """predicate()'s first true value within `timeout` s; fails the test at the timeout, or as
    soon as `bg` (anything with .proc and .output) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if bg is not None and bg.proc.poll() is not None:
            pytest.fail(f"exited ({bg.proc.returncode}) before {what}:\n{bg.output[-5000:]}")
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def tree_digest(d: Path) -> str:
    """A hash of every path and file content under `d`: equal digests = untouched tree."""
    h = hashlib.sha256()
    for p in sorted(Path(d).rglob("*")):
        h.update(str(p.relative_to(d)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()
