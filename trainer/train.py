"""`python -m trainer.train [hydra overrides]`: validate, train on Ray, print the result.

python -m trainer.train                                  # the defaults in conf/config.yaml
python -m trainer.train +experiment=demo                 # what `make train` runs
python -m trainer.train model=gpt2-124m parallel=zero3 cluster=ray trainer.max_steps=5000
python -m trainer.train -m optim.lr=1e-3,3e-4            # a sweep: parallel runs on Ray
python -m trainer.train --check [-m] [overrides]         # validate only (exit 0 or 2)

--check composes and validates the config (with -m: every job of the sweep, as the sweep
validates them) and exits without starting Ray or touching run.root: 0 and a last line
`ok: {json}` (cluster/submit.py reads it, this machine's object-store settings included), or 2
and one `error:` line.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from data_pipeline import storage
from trainer.config import ConfigError, RootConfig, load_config
from trainer.driver.preflight import check_inputs

FLAGS = ("-m", "--multirun", "--check")


def main(argv: Optional[list[str]] = None) -> int:
    from trainer.startup_trace import mark

    mark("driver: imports done")
    argv = list(sys.argv[1:] if argv is None else argv)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    check = "--check" in argv
    overrides = [a for a in argv if a not in FLAGS]
    if not check:
        from cluster.launch import stop_grace_warning

        warning = stop_grace_warning()  # a Ray job under Ray's 3 s stop grace: say so first
        if warning:
            print(warning, file=sys.stderr, flush=True)
    try:
        if multirun:
            from trainer.driver.sweep.multirun import run_sweep

            return run_sweep(overrides, check=check)
        cfg = load_config(overrides)
        storage.configure(cfg.storage)  # this process's and (remote_env) its jobs' policy
        check_inputs(cfg)
        if check:
            from data_pipeline.storage import remote_env

            a = cfg.cluster.address
            info = {"run": cfg.run.name, "run.root": cfg.run.root, "cluster.address": a}
            info["storage_env"] = remote_env(other_machines=True)  # for cluster/submit.py
            print(f"run {cfg.run.name}: config valid (nothing started)")
            print("ok: " + json.dumps(info), flush=True)
            return 0
        return train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


def train(cfg: RootConfig) -> int:
    """Trains one run and prints its summary; raises ConfigError on bad input."""
    from data_pipeline.config import DataError
    from data_pipeline.storage import StorageError
    from trainer.driver.report import print_summary
    from trainer.driver.run import run_training

    try:
        summary = run_training(cfg, progress_bar=sys.stdout.isatty())
    except ConfigError:
        raise
    except (DataError, StorageError) as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - the edge: turn Ray/DeepSpeed failures into a line
        from trainer.driver.errors import below, explain

        if line := below(e, cfg.run_uri):  # a full disk, a lost permission, a failing store
            print(f"error: {line}", file=sys.stderr)
            return 2
        print(f"error: training failed: {explain(e)}", file=sys.stderr)
        print(f"       {logs_hint(cfg)}", file=sys.stderr)
        return 1
    print_summary(summary)
    from trainer.startup_trace import mark

    mark("driver: summary printed")
    if summary.get("stopped_by"):
        print(
            f"stopped at step {summary.get('final_step')} ({summary['stopped_by']}); "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 143  # 128 + SIGTERM: stopped early, not finished
    return 0 if summary else 1


def logs_hint(cfg: RootConfig) -> str:
    """Where to look after a failed run: the run directory, and Ray's logs only when the run
    went through Ray (an in-process run has none)."""
    if cfg.cluster.in_process:
        return f"run files: {cfg.run_uri}  (trained in this process, without Ray: no Ray logs)"
    return f"worker logs: {cfg.run_uri}  (and Ray's logs under /tmp/ray)"


def exit_now(code: int) -> None:
    """Ends the process with `code` once the exit handlers have run and the output is flushed,
    skipping the interpreter's teardown of torch, DeepSpeed and gloo objects (3-4 s on 2 cores
    after a run that already wrote and closed everything)."""
    import atexit
    import os

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
