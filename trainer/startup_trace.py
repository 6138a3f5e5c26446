"""Where a run's start and end go: `RAYGPT_LAUNCH_T0=<unix time>` makes the driver and the
workers print `[startup +12.34s] <phase>` lines to stderr at each phase (bench/startup.py sets
it at launch). Unset, mark() does nothing."""

from __future__ import annotations

import os
import sys
import time

T0_ENV = "RAYGPT_LAUNCH_T0"


def mark(phase: str) -> None:
    t0 = os.environ.get(T0_ENV)
    if t0:
        print(f"[startup +{time.time() - float(t0):.2f}s] {phase}", file=sys.stderr, flush=True)
