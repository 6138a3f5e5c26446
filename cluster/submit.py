"""`python -m cluster.submit --address http://head:8265 [overrides]`: validate here, then submit.

Composes and validates the config on this machine first (a bad value costs seconds, not a
queued GPU job), then submits `python -m trainer.train <overrides>` with `ray job submit`'s
API, uploading this checkout as the working directory, and follows the job's logs.

The job's runtime_env carries, as env_vars (the job's driver and every Ray Train worker get
them; Ray merges a job's env_vars into each actor's):

* RAY_JOB_STOP_WAIT_TIME_S (--stop-grace-s, default 120): `ray job stop` sends SIGTERM to the
  job's driver and SIGKILLs it after this many seconds. Ray's default is 3 s, too short for
  raygpt's answer to SIGTERM: the workers reach the next stop decision (every
  trainer/worker/control.py EVERY_STEPS steps), save a checkpoint, upload it to run.root and
  write the summary. Ray's JobSupervisor, the actor that runs the driver, reads the variable
  from its own environment when it stops the job (ray/dashboard/modules/job/
  job_supervisor.py), and that actor runs with the job's runtime_env, so the grace is per job.
  Pick it above the time of EVERY_STEPS steps plus one checkpoint upload. (RAY_JOB_STOP_SIGNAL
  is read the same way; raygpt wants the default, SIGTERM.)
* The object-store settings of this machine (data_pipeline.storage.REMOTE_ENV_VARS that are
  set, except those naming files on this machine), so run.root / data.out_dir on s3:// or
  gs:// are reached as from here, like the workers of a `python -m trainer.train` driver.
  --no-storage-env leaves storage to the cluster's own settings (instance roles); note that a
  job's env_vars are visible to whoever can read the cluster's job list.
* RAYGPT_* variables of this environment (e.g. RAYGPT_FAULT for a fault drill).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from trainer.config import ConfigError, load_config

# gitignore-style: anchored, so conf/data/ still travels
EXCLUDES = [
    "/.venv", "/.git", "/runs", "/data", "/outputs", "/multirun", "/build", "/.pytest_raygpt_cache",
    "wandb/", "*.egg-info", "__pycache__/", ".ruff_cache/",
]  # fmt: skip
STOP_GRACE_S = 120
# Settings that name a file on the submitting machine: not forwarded.
LOCAL_FILE_VARS = {
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE",
    "GOOGLE_APPLICATION_CREDENTIALS",
}  # fmt: skip


def job_env(*, stop_grace_s: int, storage_env: bool = True) -> dict[str, str]:
    """env_vars of the submitted job's runtime_env (see the module docstring)."""
    from data_pipeline.storage import remote_env

    env = {"RAY_JOB_STOP_WAIT_TIME_S": str(int(stop_grace_s))}
    if storage_env:
        env.update({k: v for k, v in remote_env().items() if k not in LOCAL_FILE_VARS})
    env.update({k: v for k, v in os.environ.items() if k.startswith("RAYGPT_")})
    return env


def main(argv: list[str] | None = None) -> int:
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
    args, overrides = parser.parse_known_args(argv)
    if not any(o.startswith("cluster=") or o.startswith("cluster.address=") for o in overrides):
        overrides = ["cluster=ray", *overrides]
    try:
        cfg = load_config(overrides, default_name="submitted")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.cluster.address is None:
        print(
            "error: cluster.address is null: a submitted job must join its cluster "
            "(use cluster=ray or cluster.address=auto)",
            file=sys.stderr,
        )
        return 2
    if args.stop_grace_s < 1:
        print(f"error: --stop-grace-s ({args.stop_grace_s}) must be >= 1", file=sys.stderr)
        return 2
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    entrypoint = "python -m trainer.train " + " ".join(shlex.quote(o) for o in overrides)
    runtime_env = {
        "working_dir": ".",
        "excludes": EXCLUDES,
        "env_vars": job_env(stop_grace_s=args.stop_grace_s, storage_env=not args.no_storage_env),
    }
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"submitted {job_id}: {entrypoint}", flush=True)
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
