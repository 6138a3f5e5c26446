"""`python -m trainer.train -m <overrides>`: run_sweep runs Hydra's multirun with raygpt's
launcher (launcher.py) and turns its end into an exit code: 0 every job finished, 1 a job
failed, 143 a job stopped on its own, 128+signal the sweep was stopped, 2 (ConfigError, one
line, before any job starts) bad input. `--check -m`: run_sweep(check=True).

The state of one invocation lives in its SweepSession, which run_sweep hands Hydra as the task
function; Hydra hands it to the launcher's setup, which starts the sweep with it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Optional

from omegaconf import DictConfig

from data_pipeline import storage
from data_pipeline.lease import Lease, dir_lease
from trainer.config import CONF_DIR, ConfigError
from trainer.driver.sweep import hydra_private, launcher
from trainer.driver.sweep.plan import SweepPlan, locate_bad_job, override_key
from trainer.driver.sweep.record import SweepRecord
from trainer.driver.sweep.report import print_check, write_report
from trainer.driver.sweep.runner import SweepChecked, SweepRunner, SweepStopped


class SweepSession:
    """One invocation's sweep: Hydra's task function for it, which Hydra never calls (the jobs
    are processes) but hands to the launcher, whose setup calls start()."""

    def __init__(self, check: bool):
        self.check = check  # validate only: no Ray, no storage
        self.runner: Optional[SweepRunner] = None
        self.lease: Optional[Lease] = None  # the sweep directory's, while the sweep runs

    def start(self, config: DictConfig) -> SweepRunner:
        """The sweep of this invocation, made from the master config on the first call."""
        if self.runner is None:
            plan = SweepPlan.from_hydra(config)
            record = SweepRecord(plan) if self.check else SweepRecord.load(plan)
            if not self.check:  # one sweep process per sweep directory
                what = f"sweep {plan.name!r} ({plan.dir})"
                remedy = "stop it (Ctrl-C or SIGTERM), or choose another sweep.name"
                try:
                    self.lease = dir_lease(plan.dir, what, remedy=remedy).acquire()
                except storage.StorageError as e:
                    raise ConfigError(str(e)) from None
            self.runner = SweepRunner(plan, record, check=self.check)
            self.runner.install_signal_handlers()
        return self.runner

    def __call__(self, cfg: DictConfig) -> None:
        raise AssertionError("raygpt's launcher runs jobs as processes, never the task function")


@contextlib.contextmanager
def signals_restored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def hydra_error_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0].rstrip(".") if text else type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip():
        c = str(cause).strip().splitlines()[0]
        if c not in first:
            first = f"{first}: {c}"
    return first


def run_sweep(overrides: list[str], *, check: bool = False) -> int:
    """`python -m trainer.train -m <overrides>`: returns the exit code; raises ConfigError
    (one line, before any job starts) on bad input.

    check (`--check -m`): the sweep's own checks and nothing else: the sweeper expands its
    (first) batch of jobs, every job's config is validated as its run will validate it, a job
    that cannot fit a local cluster is refused; no Ray, nothing read or written in run.root
    (the sweep directory is checked when the sweep runs). Prints `ok: {...}` (JSON: the sweep's
    name, directory, job count, cluster.address) and returns 0."""
    for o in overrides:
        if override_key(o) in ("hydra/launcher", "hydra.sweep.dir"):
            raise ConfigError(
                f"{o}: raygpt sweeps run through their own launcher and directory "
                "(run.root/<sweep.name>); set sweep.max_parallel for parallelism"
            )
    launcher.register()
    session = SweepSession(check)
    hydra_dir = tempfile.mkdtemp(prefix="raygpt-sweep-")
    code = 0
    try:
        with signals_restored():
            try:
                code = _multirun(session, overrides, hydra_dir)
            finally:
                if session.runner is not None and not _close(session.runner, hydra_dir):
                    code = code or 1
    finally:
        shutil.rmtree(hydra_dir, ignore_errors=True)
        if session.lease is not None:
            session.lease.release()
    if session.runner is None:
        return code
    return code or session.runner.exit_code()


def _multirun(session: SweepSession, overrides: list[str], hydra_dir: str) -> int:
    """Hydra's multirun of the sweep; its end as an exit code (0: see the jobs' statuses)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from trainer.driver.errors import explain

    own = [f"hydra/launcher={launcher.NAME}", f"hydra.sweep.dir={hydra_dir}"]
    try:
        hydra_private.run_multirun(str(CONF_DIR), "config", [*overrides, *own], session)
    except SweepStopped as e:
        return e.exit_code
    except SweepChecked as e:
        print_check(e.plan, e.jobs)
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException) as e:
        if session.runner is None or not session.runner.ran_any:
            where = locate_bad_job(overrides)
            raise ConfigError(where or f"sweep: {hydra_error_line(e)}") from None
        print(f"error: sweep: {hydra_error_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - Ray failing to start, a sweeper failing
        from data_pipeline.failures import describe

        if line := describe(e, safe=SWEEP_SAFE, where=hydra_dir):  # a full disk, a store down
            print(f"error: sweep: {line}", file=sys.stderr)
            return 2
        print(f"error: sweep: {explain(e)}", file=sys.stderr)
        return 1
    return 0


# What a sweep stopped by a failure below leaves (data_pipeline/failures.py's line): its records
# are written whole (storage.write_text), each job is a run that resumes from its checkpoints.
SWEEP_SAFE = "the sweep's records are written whole; the same command resumes every job"


def _close(runner: SweepRunner, hydra_dir: str) -> bool:
    """Stops what still runs; writes sweep.json, Hydra's files and the report. False (with an
    `error:` line) where that failed, e.g. the sweep directory unreachable."""
    from trainer.driver.errors import explain

    try:
        runner.shutdown()
        record = runner.record
        if record.jobs:
            record.keep_hydra_files(hydra_dir)
            record.save()
            write_report(record, runner.wall_s())
    except Exception as e:  # noqa: BLE001
        from data_pipeline.failures import describe

        line = describe(e, safe=SWEEP_SAFE, where=hydra_dir) or explain(e)
        print(f"error: sweep: writing its files failed: {line}", file=sys.stderr)
        return False
    return True
