"""`python -m cluster.submit --address http://head:8265 [overrides]`: validate here, then submit.

Composes and validates the config on this machine first (a bad value costs seconds, not a
queued GPU job), then submits `python -m trainer.train <overrides>` with `ray job submit`'s
API, uploading this checkout as the working directory, and follows the job's logs.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from trainer.config import ConfigError, load_config

# gitignore-style: anchored, so conf/data/ still travels
EXCLUDES = ["/.venv", "/.git", "/runs", "/data", "/outputs", "/multirun", "wandb/", "*.egg-info"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://head:8265")
    parser.add_argument("--no-wait", action="store_true", help="submit and return")
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
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    entrypoint = "python -m trainer.train " + " ".join(shlex.quote(o) for o in overrides)
    job_id = client.submit_job(
        entrypoint=entrypoint, runtime_env={"working_dir": ".", "excludes": EXCLUDES}
    )
    print(f"submitted {job_id}: {entrypoint}")
    if args.no_wait:
        return 0
    import asyncio

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="")

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
