"""Fault drills: hold one worker still at a chosen point so a test (or an operator rehearsing
a failure) can kill it, kill the driver, or let a collective time out.

    RAYGPT_FAULT="pause@<point>:<step>[:rank=<r>][:hold=<s>][,...]"   e.g. pause@upload:4:rank=0

Points: `step` (before the step's forward pass), `save` (this rank's checkpoint shards written
locally, not yet uploaded) and `upload` (about to upload them into the run directory; ranks that
do not pause upload theirs, so the run directory holds a half-written checkpoint). The paused
worker writes run_dir/faults/<point>_<step>_rank<r>.json ({"pid": ...}) and sleeps until it is
killed or `hold` seconds (default 600) pass. The marker also makes the drill fire once per run directory: a
restarted or resumed run goes past that point. Unset (always, outside drills), it costs a dict
lookup.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ENV = "RAYGPT_FAULT"
POINTS = ("step", "save", "upload")
_SPEC = re.compile(
    r"pause@(?P<point>\w+):(?P<step>\d+)(?::rank=(?P<rank>\d+))?(?::hold=(?P<hold>[\d.]+))?"
)


@dataclass(frozen=True)
class Fault:
    point: str
    step: int
    rank: int = 0
    hold_s: float = 600.0

    def marker(self, run_dir: Path) -> Path:
        return Path(run_dir) / "faults" / f"{self.point}_{self.step}_rank{self.rank}.json"


def parse(spec: Optional[str]) -> list[Fault]:
    """The drills named by RAYGPT_FAULT's value. A malformed value is a ValueError."""
    faults = []
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        m = _SPEC.fullmatch(part)
        if m is None or m["point"] not in POINTS:
            raise ValueError(
                f"{ENV}: {part!r} is not pause@<point>:<step>[:rank=<r>][:hold=<s>] "
                f"with point in {POINTS}"
            )
        hold = float(m["hold"]) if m["hold"] else 600.0
        faults.append(Fault(m["point"], int(m["step"]), int(m["rank"] or 0), hold))
    return faults


def from_env() -> list[Fault]:
    return parse(os.environ.get(ENV))


def maybe_pause(faults: list[Fault], point: str, step: int, rank: int, run_dir: Path) -> None:
    """Blocks this worker if a drill names this point, step and rank (first time only)."""
    for fault in faults:
        if (fault.point, fault.step, fault.rank) == (point, step, rank):
            _pause(fault, run_dir)


def _pause(fault: Fault, run_dir: Path) -> None:
    marker = fault.marker(run_dir)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "time": time.time()}) + "\n")
    os.replace(tmp, marker)
    where = f"rank {fault.rank} paused at {fault.point} of step {fault.step}"
    print(f"[fault] {where} for up to {fault.hold_s:g} s (pid {os.getpid()})", flush=True)
    time.sleep(fault.hold_s)
