"""Where this machine's CPU goes: CPU seconds per process over a window, as a share of a core,
read from /proc (Linux). Run it while a training runs to see what Ray's own processes take
next to the worker:

    python -m bench.cpu_share [--seconds 20] [--top 15]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (command line, user + system CPU seconds so far) of every readable process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        name = cmd.strip() or stat.split("(", 1)[1].rsplit(")", 1)[0]
        out[int(d.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def shares(seconds: float) -> tuple[float, list[tuple[float, int, str]]]:
    """(window seconds, [(cores used, pid, name)] sorted, busiest first)."""
    before, t0 = cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    after, dt = cpu_seconds(), time.perf_counter() - t0
    rows = [
        ((cpu - before.get(pid, (name, 0.0))[1]) / dt, pid, name)
        for pid, (name, cpu) in after.items()
    ]
    return dt, sorted((r for r in rows if r[0] > 0), reverse=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_share")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    dt, rows = shares(args.seconds)
    total = sum(r[0] for r in rows)
    ray = sum(r[0] for r in rows if "ray" in r[2].lower() and "RayTrainWorker" not in r[2])
    print(f"{dt:.1f} s window, {os.cpu_count()} cores: {total:.2f} cores busy, of which Ray's own")
    print(f"processes (not the training worker) {ray:.2f} ({len(rows)} processes used any CPU)")
    for used, pid, name in rows[: args.top]:
        print(f"{100 * used:6.1f}%  {pid:>7}  {name[:90]}")


if __name__ == "__main__":
    main()
