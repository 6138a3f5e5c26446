"""Start-up and shut-down of a small run: launch-to-first-step and last-step-to-exit, with
where the time goes.

Runs `python -m trainer.train` (a 2-step gpt-tiny run on 1 worker by default, its data
prepared first, outside the timing) as a subprocess with RAYGPT_LAUNCH_T0 set, so the driver
and the worker print `[startup +t] phase` lines (trainer/startup_trace.py); reads the first
and last `step N/M` lines and the exit time. Next to it, the time a plain PyTorch loop takes
from launch to its first step (bench/bare_loop.py's model, same shape), for scale.

    python -m bench.startup [--repeat 3] [--overrides 'cluster.num_workers=2 ...'] [--phases]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from statistics import median
from typing import Any

from bench import common

RUN = [
    "+experiment=smoke",
    "logging.mode=disabled",
    "trainer.max_steps=2",
    "cluster.num_workers=1",
    "precision=fp32",
]
STEP = re.compile(r"step\s+(\d+)/(\d+)")
PHASE = re.compile(r"\[startup \+([\d.]+)s\] (.*)")

BARE = """
import time, os
t0 = float(os.environ["T0"])
import torch
from models.gpt import GPT, GPTConfig
m = GPT(GPTConfig(n_layer=2, d_model=64, n_head=4, vocab_size=512, block_size=64))
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x = torch.randint(0, 512, (8, 64))
_, loss = m(x, x)
loss.backward(); opt.step()
print(f"first step {time.time() - t0:.2f}", flush=True)
"""


def run_once(overrides: list[str]) -> dict[str, Any]:
    """One launch: seconds to the first step line, from the last step line to exit, the
    total, and the phase lines."""
    env = dict(os.environ)
    t0 = time.time()
    env["RAYGPT_LAUNCH_T0"] = repr(t0)
    cmd = [common.PYTHON, "-m", "trainer.train", *RUN, *overrides]
    proc = subprocess.Popen(
        cmd,
        cwd=common.ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first = last = None
    phases: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.time() - t0
        m = PHASE.search(line)
        if m:
            phases.append((float(m.group(1)), m.group(2).strip()))
            continue
        if STEP.search(line):
            first = now if first is None else first
            last = now
    rc = proc.wait()
    total = time.time() - t0
    if rc != 0 or first is None:
        raise SystemExit(f"bench.startup: {shlex.join(cmd)} exited {rc} (first step: {first})")
    return {"first": first, "exit_after_last": total - last, "total": total, "phases": phases}


def bare_first_step() -> float:
    """Seconds from launch to a plain PyTorch loop's first optimizer step."""
    env = {**os.environ, "T0": repr(time.time())}
    out = subprocess.run(
        [common.PYTHON, "-c", BARE], cwd=common.ROOT, env=env, capture_output=True, text=True
    )
    m = re.search(r"first step ([\d.]+)", out.stdout)
    if not m:
        raise SystemExit(f"bench.startup: bare loop failed: {out.stderr.strip()[-500:]}")
    return float(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--overrides", default="", help="more trainer.train overrides")
    ap.add_argument("--phases", action="store_true", help="print each run's phase lines")
    args = ap.parse_args(argv)
    overrides = shlex.split(args.overrides)
    prep = [common.PYTHON, "-m", "data_pipeline.prepare", "+experiment=smoke"]
    subprocess.run(prep, cwd=common.ROOT, check=True, capture_output=True)
    runs = []
    for i in range(args.repeat):
        r = run_once(overrides)
        runs.append(r)
        print(
            f"run {i + 1}: launch->first step {r['first']:.1f} s, last step->exit "
            f"{r['exit_after_last']:.1f} s, total {r['total']:.1f} s",
            flush=True,
        )
        if args.phases:
            for t, what in r["phases"]:
                print(f"    {t:7.2f}  {what}")
    bare = bare_first_step()
    print()
    print(f"command: python -m trainer.train {shlex.join(RUN + overrides)}")
    print(f"load average at end: {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()})")
    rows = [
        ("launch -> first step", median(r["first"] for r in runs)),
        ("last step -> exit", median(r["exit_after_last"] for r in runs)),
        ("launch -> exit", median(r["total"] for r in runs)),
        ("plain PyTorch loop: launch -> first step", bare),
    ]
    for name, seconds in rows:
        print(f"  {name:42s} {seconds:6.1f} s")
    print(f"  (raygpt rows: the median of {len(runs)} launches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
