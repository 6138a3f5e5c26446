"""`python -m cluster.submit --address http://head:8265 [overrides]`: validate here, then submit.

    python -m cluster.submit --address URL [options] [overrides]           # one run
    python -m cluster.submit --address URL [options] -- python -m trainer.train [-m] [overrides]

The second form submits the entrypoint as written, a sweep (`-m`) included: the sweep then runs
on the cluster, its jobs in parallel there (trainer/driver/sweep/), and `ray job stop` stops
every job with a checkpoint. Without a `cluster=` or `cluster.address=` override, `cluster=ray`
is added (join the cluster the job runs on).

Before submitting, the entrypoint validates itself on this machine: `python -m trainer.train
--check [-m] <overrides>` in a subprocess (a bad value costs seconds, not a queued GPU job;
for a sweep, every job is expanded and validated). Its one `error:` line and exit code (2) are
passed on, and nothing is submitted. cluster/ imports nothing from trainer/: the check is the
entrypoint's own. Then the job is submitted with `ray job submit`'s API, uploading this
checkout (run this from its root) as the working directory, and its logs are followed.

The job's runtime_env carries, as env_vars (the job's driver and every Ray Train worker get
them; Ray merges a job's env_vars into each actor's, and a sweep's jobs, drivers started by
the job's driver, inherit the job's runtime_env):

* RAY_JOB_STOP_WAIT_TIME_S (--stop-grace-s, default 120): `ray job stop` sends SIGTERM to the
  job's driver and SIGKILLs it after this many seconds. Ray's default is 3 s, too short for
  raygpt's answer to SIGTERM: the workers reach the next stop decision (every
  trainer/worker/control.py EVERY_STEPS steps), save a checkpoint, upload it to run.root and
  write the summary. Ray's JobSupervisor, the actor that runs the driver, reads the variable
  from its own environment when it stops the job (ray/dashboard/modules/job/
  job_supervisor.py), and that actor runs with the job's runtime_env, so the grace is per job.
  Pick it above the time of EVERY_STEPS steps plus one checkpoint upload (a sweep: its running
  jobs checkpoint side by side, within the same grace). (RAY_JOB_STOP_SIGNAL
  is read the same way; raygpt wants the default, SIGTERM.)
* The object-store settings of this machine (endpoint, region, profile; not access keys, and
  not the settings that name files on this machine), as the entrypoint's check reports them in
  its `ok:` line (data_pipeline/storage.py's remote_env: cluster/ imports no storage code), so
  run.root / data.out_dir on s3:// or gs:// are reached at the same place as from here.
  Credentials are the cluster's own (an instance role, or keys in the nodes' environment): a
  job's env_vars are visible to whoever can list the cluster's jobs. --no-storage-env leaves
  every storage setting to the cluster.
* RAYGPT_* variables of this environment (e.g. RAYGPT_FAULT for a fault drill).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

# gitignore-style: anchored, so conf/data/ still travels
EXCLUDES = [
    "/.venv", "/.git", "/runs", "/data", "/outputs", "/multirun", "/build", "/.pytest_raygpt_cache",
    "wandb/", "*.egg-info", "__pycache__/", ".ruff_cache/",
]  # fmt: skip
STOP_GRACE_S = 120
ENTRY_MODULE = "trainer.train"
MULTIRUN = ("-m", "--multirun")


def job_env(*, stop_grace_s: int, storage_env: dict[str, str]) -> dict[str, str]:
    """env_vars of the submitted job's runtime_env (see the module docstring); storage_env: the
    object-store settings the entrypoint's check reported ({} for --no-storage-env)."""
    env = {"RAY_JOB_STOP_WAIT_TIME_S": str(int(stop_grace_s))}
    env.update(storage_env)
    env.update({k: v for k, v in os.environ.items() if k.startswith("RAYGPT_")})
    return env


class SubmitError(ValueError):
    """Bad input to this command; str() is one line."""


def split_entrypoint(argv: list[str]) -> tuple[list[str], Optional[str], list[str]]:
    """(this command's options, the entrypoint's interpreter or None, the entrypoint's
    arguments after `-m trainer.train`) from either form of the command line."""
    if "--" not in argv:
        return argv, None, []
    i = argv.index("--")
    opts, entry = argv[:i], argv[i + 1 :]
    if len(entry) < 3 or entry[1:3] != ["-m", ENTRY_MODULE] or "python" not in Path(entry[0]).name:
        got = " ".join(shlex.quote(a) for a in entry) or "nothing"
        raise SubmitError(
            f"the entrypoint after -- must be `python -m {ENTRY_MODULE} [-m] [overrides]` "
            f"(got {got})"
        )
    return opts, entry[0], entry[3:]


def with_cluster(args: list[str]) -> list[str]:
    """`cluster=ray` first unless a cluster group or address is given: a submitted job joins
    the cluster it runs on."""
    keys = [a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a]
    if any(k in ("cluster", "cluster.address") for k in keys):
        return list(args)
    flags = [a for a in args if a in MULTIRUN]
    return [*flags, "cluster=ray", *(a for a in args if a not in MULTIRUN)]


def check_entrypoint(args: list[str]) -> dict:
    """Runs `python -m trainer.train --check <args>` here; returns the `ok:` line's JSON or
    raises SubmitError with the entrypoint's own error line (and its exit code)."""
    proc = subprocess.run(
        [sys.executable, "-m", ENTRY_MODULE, "--check", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    oks = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok: ")]
    if proc.returncode == 0 and oks:
        return json.loads(oks[-1][4:])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    line = errors[-1][len("error:") :].strip() if errors else None
    if line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        line = f"`python -m {ENTRY_MODULE} --check` failed ({proc.returncode}): {tail}"
    err = SubmitError(line)
    err.exit_code = proc.returncode if proc.returncode not in (0, None) else 2
    raise err


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://head:8265")
    parser.add_argument("--no-wait", action="store_true", help="submit and return")
    parser.add_argument(
        "--stop-grace-s",
        type=int,
        default=STOP_GRACE_S,
        help=f"seconds `ray job stop` waits for the checkpoint before SIGKILL ({STOP_GRACE_S})",
    )
    parser.add_argument(
        "--no-storage-env",
        action="store_true",
        help="do not pass this machine's AWS_*/GOOGLE_* storage settings to the job",
    )
    try:
        opts, python, entry_args = split_entrypoint(argv)
        if python is None:  # the first form: what argparse does not know are overrides
            args, entry_args = parser.parse_known_args(opts)
            python = "python"
        else:
            args = parser.parse_args(opts)
        if args.stop_grace_s < 1:
            raise SubmitError(f"--stop-grace-s ({args.stop_grace_s}) must be >= 1")
        entry_args = with_cluster(entry_args)
        info = check_entrypoint(entry_args)
        if info.get("cluster.address") is None:
            raise SubmitError(
                "cluster.address is null: a submitted job must join its cluster "
                "(use cluster=ray or cluster.address=auto)"
            )
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    entrypoint = " ".join(shlex.quote(a) for a in [python, "-m", ENTRY_MODULE, *entry_args])
    runtime_env = {
        "working_dir": ".",
        "excludes": EXCLUDES,
        "env_vars": job_env(
            stop_grace_s=args.stop_grace_s,
            storage_env={} if args.no_storage_env else info.get("storage_env", {}),
        ),
    }
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    what = f"sweep {info['sweep']} ({info['jobs']} job(s))" if "sweep" in info else "run"
    print(f"submitted {job_id}: {entrypoint}", flush=True)
    print(f"  {what}; run.root {info.get('run.root')}", flush=True)
    print(
        f"  stop it with: ray job stop --address {args.address} {job_id}  (checkpoints first; "
        f"SIGKILL after {args.stop_grace_s} s)",
        flush=True,
    )
    if args.no_wait:
        return 0
    import asyncio

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
