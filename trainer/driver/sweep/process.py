"""One sweep job as its own process, `python -m trainer.train <args>`: in a session of its own
(clear of the terminal's signals), killed when the sweep's process dies (Linux), its output
echoed with a `(<run>) ` prefix and kept in its log with UTC times, its last `error:` line kept;
and whether a process has a SIGTERM handler (raygpt's, while it trains) now."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Optional

from trainer.driver.sweep.plan import Job, utc_now

PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    """preexec_fn: the job gets SIGKILL when the sweep process dies, even by SIGKILL."""
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # looked up before the fork
    except OSError:  # not glibc Linux: jobs are still killed on every exit but SIGKILL
        prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the sweep died before prctl took hold
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def catches_sigterm(pid: int) -> Optional[bool]:
    """Whether process `pid` has a SIGTERM handler now (Linux /proc/<pid>/status SigCgt);
    None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


class JobProcess:
    """One attempt of a job: its process, its output, its error line."""

    def __init__(self, job: Job, args: list[str], log_path: str):
        self.job = job
        self.log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed in finish()
        self.log.write(f"# {utc_now()} python -m trainer.train {' '.join(args)}\n")
        self.error: Optional[str] = None
        self.signaled = False
        self.armed = False  # seen with a SIGTERM handler (raygpt's, while it trains)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.train", *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()),
        )
        self.threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, sys.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, sys.stderr), daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _pump(self, pipe, out) -> None:
        prefix = f"({self.job.name}) "
        for line in pipe:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
            self.log.write(f"{stamp} {line}")  # the log: each line with its UTC time
            if out is sys.stderr and line.startswith("error:"):
                self.error = line.strip()
            try:
                out.write(prefix + line)
                out.flush()
            except (OSError, ValueError):
                pass

    def signal(self, signum: int) -> None:
        self.signaled = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def finish(self) -> int:
        for t in self.threads:
            t.join(timeout=10)
        self.log.close()
        return self.proc.returncode
