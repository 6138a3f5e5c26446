"""The whole product on one GPU, and the engine A/B of the GPU defaults (bench/gpu_full.sh).

Two parts, each one invocation (the shell script runs each under its own `timeout`):

  ray   python -m data_pipeline.prepare (the smoke experiment's corpus), then three runs of
        `python -m trainer.train` through Ray Train (cluster.launch=ray, one worker with one
        GPU; --cpu-dry-run: gpus_per_worker 0, fp32): a reference run of STEPS steps with eval
        and checkpoints; the same run held at step KILL_AT (trainer/worker/faults.py) and
        killed with SIGKILL (the driver's process group: Ray's processes go with it) once the
        checkpoint of step CKPT is registered; the same command again, which resumes from that
        checkpoint. The resumed losses are compared with the reference run's (exact in fp32;
        reported as the largest relative difference in bf16, where GPU kernels need not be
        bit-reproducible); then python -m trainer.export writes the Hugging Face directory.
  ab    for one model, bench/gpu_check.py (the engine in one process, NCCL world size 1) once
        with the config as it is ("defaults"), then the bare PyTorch loop (the yardstick),
        then once per row of AB with that one setting flipped: tokens/s and MFU of each, one
        process each, in that order until the time given is spent.

Every record goes to --out as one JSON line with the commit measured (RAYGPT_COMMIT, else
`git rev-parse HEAD`, else "unknown"). --cpu-dry-run: the same steps on the CPU with tiny sizes.

    python -m bench.gpu_full ray --work DIR --out results.jsonl [--cpu-dry-run]
    python -m bench.gpu_full ab --model gpt2-124m --out results.jsonl [--cpu-dry-run]
    python -m bench.gpu_full summary results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The A/B: each setting of trainer/config.py that part 1 of issue 20 tunes for the GPU, flipped
# one at a time from the config as it is. (setting, value to try, models it applies to: None =
# every model). Add a row when a setting is added; `ab` runs the rows in this order until its
# time is spent, so put the ones that matter most first.
AB: list[tuple[str, str, tuple[str, ...] | None]] = [
    # the defaults are "auto" (on on CUDA): each row turns one off
    ("optim.fused", "false", None),
    ("trainer.loss_chunk_tokens", "0", None),
    ("parallel.overlap_comm", "false", None),
    ("precision.fp32_grad_accum", "false", None),
    ("trainer.compile", "false", None),
    ("model.activation_checkpointing", "true", ("gpt-1.3b",)),
]
AB_STAGE = 2  # ZeRO-2: where overlap_comm and the buckets act; the conf/ default

STEPS, CKPT, KILL_AT = 12, 6, 9  # the Ray runs: steps, checkpoint interval, the kill point


def commit() -> str:
    if os.environ.get("RAYGPT_COMMIT"):
        return os.environ["RAYGPT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def record(path: str, row: dict[str, Any]) -> None:
    row = {"commit": commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row}
    print("RESULT " + json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# -- ray ------------------------------------------------------------------------------------


def train_overrides(work: Path, dry: bool, name: str) -> list[str]:
    device = (
        ["precision=fp32", "cluster.gpus_per_worker=0", "trainer.peak_flops=1e11"]
        if dry
        else ["precision=bf16", "cluster.gpus_per_worker=1"]
    )
    return [
        "+experiment=smoke",
        "cluster=local",
        "cluster.launch=ray",
        "cluster.num_workers=1",
        *device,
        f"trainer.max_steps={STEPS}",
        f"trainer.checkpoint_interval={CKPT}",
        f"trainer.eval_interval={CKPT}",
        "trainer.sample_tokens=8",
        "logging.mode=disabled",
        f"data.out_dir={work / 'data'}",
        f"run.root={work / 'runs'}",
        f"run.name={name}",
    ]


def _python(*args: str, timeout: float, env: dict | None = None, log: Path) -> float:
    """`python args...` in the repository root, in a process group of its own (on a timeout
    the whole group is killed: Ray's processes too); its output into `log`; seconds taken."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
            raise RuntimeError(f"{' '.join(args[:2])} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(args[:2])} exited {proc.returncode}:\n{tail}")
    return time.perf_counter() - t0


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the run's metrics.jsonl (the last row of a step: after a resume)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r["loss"] for r in rows}


def kill_when_held(cmd: list[str], run_dir: Path, log: Path, timeout: float) -> float:
    """Runs `cmd` held at step KILL_AT; SIGKILL to its process group once that hold began and
    checkpoint CKPT is registered. Seconds until the kill."""
    from trainer.checkpoint import index

    env = {**os.environ, "RAYGPT_FAULT": f"pause@step:{KILL_AT}:rank=0:hold=600"}
    marker = run_dir / "faults" / f"step_{KILL_AT}_rank0.json"
    want = f"checkpoint_{CKPT:08d}"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while not (marker.is_file() and want in index.registered(str(run_dir))):
                if proc.poll() is not None:
                    raise RuntimeError(f"the run to kill exited {proc.returncode} first")
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"no hold at step {KILL_AT} within {timeout:.0f} s")
                time.sleep(0.5)
            took = time.perf_counter() - t0
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(60)
    return took


def run_ray(args: argparse.Namespace) -> int:
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    logs, dry = work / "logs", args.cpu_dry_run
    res: dict[str, Any] = {"kind": "ray", "cpu_dry_run": dry, "steps": STEPS}
    ok = False
    try:
        data = [f"data.out_dir={work / 'data'}"]
        res["prepare_s"] = _python(
            "-m", "data_pipeline.prepare", "+experiment=smoke", *data,
            timeout=args.stage_timeout, log=logs / "prepare.log",
        )  # fmt: skip
        train = [sys.executable, "-m", "trainer.train"]
        ref = train_overrides(work, dry, "reference")
        res["reference_s"] = _python(
            *train[1:], *ref, timeout=args.stage_timeout, log=logs / "reference.log"
        )
        summary = json.loads((work / "runs" / "reference" / "summary.json").read_text())
        res["reference"] = {
            k: summary.get(k)
            for k in ("final_val_loss", "train_tokens_per_sec", "mfu", "finished", "layout")
        }
        cmd = [*train, *train_overrides(work, dry, "killed")]
        run_dir = work / "runs" / "killed"
        res["killed_after_s"] = kill_when_held(
            cmd, run_dir, logs / "killed.log", args.stage_timeout
        )
        res["resume_s"] = _python(*cmd[1:], timeout=args.stage_timeout, log=logs / "resumed.log")
        resumed_from = [  # rank 0's line, behind Ray's "(RayTrainWorker pid=...)" prefix
            line.split("resumed from", 1)[1].strip()
            for line in (logs / "resumed.log").read_text().splitlines()
            if "resumed from" in line
        ]
        res["resumed_from"] = resumed_from[0] if resumed_from else None
        want, got = losses(work / "runs" / "reference"), losses(run_dir)
        after = list(range(CKPT + 1, STEPS + 1))
        rel = [abs(got[s] - want[s]) / abs(want[s]) for s in after]
        res["resumed_losses"] = [got[s] for s in after]
        res["reference_losses"] = [want[s] for s in after]
        res["resume_exact"] = all(got[s] == want[s] for s in after)
        res["resume_max_rel"] = max(rel)
        out = work / "hf"
        res["export_s"] = _python(
            "-m", "trainer.export", str(run_dir), str(out), timeout=args.stage_timeout,
            log=logs / "export.log",
        )  # fmt: skip
        res["export_files"] = sorted(p.name for p in out.iterdir())
        ok = (
            bool(resumed_from)
            and f"checkpoint_{CKPT:08d}" in resumed_from[0]
            and (res["resume_exact"] if dry else res["resume_max_rel"] <= 1e-2)
            and all(math.isfinite(x) for x in res["resumed_losses"])
            and {"config.json", "model.safetensors"} <= set(res["export_files"])
            and summary.get("finished") is True
        )
    except Exception as e:  # noqa: BLE001 - recorded, and the exit status says so
        res["error"] = f"{type(e).__name__}: {e}"[-4000:]
    res["ok"] = ok
    record(args.out, res)
    return 0 if ok else 1


# -- ab -------------------------------------------------------------------------------------


def variants(model: str) -> list[tuple[str, list[str]]]:
    """(name, --set overrides) of the A/B of `model`: the defaults first, then AB's rows."""
    out: list[tuple[str, list[str]]] = [("defaults", [])]
    for setting, value, models in AB:
        if models is None or model in models:
            out.append((f"{setting}={value}", [f"{setting}={value}"]))
    return out


def run_ab(args: argparse.Namespace) -> int:
    """One bench/gpu_check.py process per variant (the bare loop second); stops starting new
    ones when --budget seconds are spent (the shell's timeout is the hard stop)."""
    t0, failed = time.perf_counter(), 0
    base = [sys.executable, "-m", "bench.gpu_check", "--model", args.model, "--no-guard",
            "--warmup", str(args.warmup), "--steps", str(args.steps)]  # fmt: skip
    if args.cpu_dry_run:
        base += ["--cpu-dry-run", "--peak-flops", "1e11", "--set", "precision=fp32"]
    runs = [(n, [*base, "--stage", str(AB_STAGE), *sum((["--set", o] for o in s), [])])
            for n, s in variants(args.model)]  # fmt: skip
    runs.insert(1, ("bare", [*base, "--bare"]))
    for name, cmd in runs:
        left = args.budget - (time.perf_counter() - t0)
        if left < 15:
            record(args.out, {"kind": "ab", "model": args.model, "variant": name,
                              "ok": False, "error": "skipped: budget spent"})  # fmt: skip
            continue
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(left, 15)
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            row = json.loads(lines[-1][len("RESULT ") :]) if lines else {}
            if proc.returncode or not row.get("ok"):
                row.setdefault("error", (proc.stdout + proc.stderr)[-2000:])
        except subprocess.TimeoutExpired:
            row = {"error": f"timed out after {left:.0f} s"}
        keep = ("tokens_per_sec", "mfu", "step_time_s", "loss", "gpu", "device", "torch",
                "build_s", "phases", "memory", "peak_flops", "error", "peak_error")  # fmt: skip
        out = {"kind": "ab", "model": args.model, "variant": name,
               "stage": None if name == "bare" else AB_STAGE, "ok": bool(row.get("ok")),
               "cpu_dry_run": args.cpu_dry_run, "wall_s": time.perf_counter() - start,
               **{k: row[k] for k in keep if k in row}}  # fmt: skip
        failed += not out["ok"]
        record(args.out, out)
    return 1 if failed else 0


# -- summary --------------------------------------------------------------------------------


def summary(path: str) -> None:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    for r in rows:
        if r.get("kind") == "ray":
            ref = r.get("reference") or {}
            print(
                f"ray path ({r['commit'][:10]}): ok={r['ok']} resume exact={r.get('resume_exact')}"
                f" max rel {r.get('resume_max_rel')}; tokens/s "
                f"{ref.get('train_tokens_per_sec')} MFU {ref.get('mfu')}; "
                + (r.get("error", "")[:300] or f"export {r.get('export_files')}")
            )
    base = {r["model"]: r for r in rows if r.get("kind") == "ab" and r.get("variant") == "defaults"}
    print(f"{'model':<10} {'variant':<36} {'ok':<5} {'tokens/s':>10} {'MFU':>7} {'x defaults':>10}")
    for r in rows:
        if r.get("kind") != "ab":
            continue
        tps, mfu, b = r.get("tokens_per_sec"), r.get("mfu"), base.get(r["model"])
        vs = f"{tps / b['tokens_per_sec']:.3f}" if tps and b and b.get("tokens_per_sec") else ""
        print(
            f"{r['model']:<10} {r['variant']:<36} {str(r['ok']):<5} {(tps or 0):>10.0f} "
            f"{(100 * mfu if mfu else float('nan')):>6.1f}% {vs:>10}  "
            + (r.get("error", "")[:120].replace("\n", " ") if not r["ok"] else "")
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ray = sub.add_parser("ray", help="prepare, train on Ray Train, kill, resume, export")
    ray.add_argument("--work", required=True, help="a scratch folder (emptied first)")
    ray.add_argument("--stage-timeout", type=float, default=180.0, help="seconds per command")
    ab = sub.add_parser("ab", help="the engine A/B of one model")
    ab.add_argument("--model", required=True)
    ab.add_argument("--budget", type=float, default=200.0, help="seconds for all variants")
    ab.add_argument("--warmup", type=int, default=2)
    ab.add_argument("--steps", type=int, default=5)
    for s in (ray, ab):
        s.add_argument("--out", required=True, help="append one JSON line per result here")
        s.add_argument("--cpu-dry-run", action="store_true", help="CPU, tiny, fp32")
    sm = sub.add_parser("summary", help="print the table of a results file")
    sm.add_argument("path")
    args = p.parse_args(argv)
    if args.cmd == "summary":
        summary(args.path)
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    return run_ray(args) if args.cmd == "ray" else run_ab(args)


if __name__ == "__main__":
    sys.exit(main())
