"""Runs a sweep's batches of jobs on one Ray cluster: each batch validated first, then up to
sweep.max_parallel of its unfinished jobs at once, each its own process (process.py), the next
starting as soon as any ends; a failed job does not stop the others. The sweep starts (or
joins) Ray once; every job joins it. Finished jobs of an earlier invocation are not rerun; the
others resume from their checkpoints (same run.name).

Stopping: SIGTERM/SIGINT asks every running job to checkpoint and stop (each exits 143), then
the sweep raises SweepStopped (exit 128+signal). A job that a SIGTERM already reached (`ray job
stop` signals every process of a submitted sweep at once) is not sent a second one, which would
stop it without its checkpoint. SIGKILL of the sweep takes its jobs with it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

from cluster.config import ClusterError
from trainer.config import ConfigError, RootConfig
from trainer.driver.sweep.plan import Job, SweepPlan, utc_now
from trainer.driver.sweep.process import JobProcess, catches_sigterm
from trainer.driver.sweep.record import SweepRecord

POLL_S = 0.2
# A stop reaches the jobs this long after the sweep's first SIGTERM/SIGINT (see _forward_stop).
FORWARD_DELAY_S = 1.0


class SweepChecked(Exception):  # noqa: N818 - a way out of Hydra's sweep, not an error
    """--check: the first batch of jobs is validated; nothing ran, nothing was written."""

    def __init__(self, plan: SweepPlan, jobs: list[Job]):
        super().__init__(f"{len(jobs)} job(s)")
        self.plan, self.jobs = plan, jobs


class SweepStopped(Exception):
    """SIGTERM/SIGINT: the running jobs checkpointed and stopped; the sweep exits 128+signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def classify(rc: int, summary: dict[str, Any], stopping: bool, error: Optional[str]) -> tuple:
    """(status, error) of a job process that exited with `rc`."""
    if rc == 0 and summary.get("finished"):
        return "finished", None
    # 143: raygpt stopped with a checkpoint; 130: Ctrl-C; asked to stop before training, a job
    # dies of the SIGTERM (< 0) or exits through Ray's handler of it (sys.exit(15)).
    if rc in (143, 130) or (stopping and (rc < 0 or rc == signal.SIGTERM)):
        return "stopped", None
    if error:
        return "failed", error
    if rc < 0:
        return "failed", f"killed by {signal.Signals(-rc).name}"
    if rc == 0:
        return "failed", "exit code 0 but its summary.json does not say finished"
    return "failed", f"exit code {rc} (no error line; see its log)"


class SweepRunner:
    """The jobs of one invocation of a sweep: its Ray cluster, its running processes, its stop.
    check (`--check -m`): the first batch is validated and SweepChecked raised; no Ray, nothing
    read or written in run.root."""

    def __init__(self, plan: SweepPlan, record: SweepRecord, *, check: bool = False):
        self.plan, self.record, self.check = plan, record, check
        self.address: Optional[str] = None  # the Ray cluster's, once connected
        self.started_ray = False
        self.running: list[JobProcess] = []
        self.stop_signum: Optional[int] = None
        self.stop_t = 0.0  # time.monotonic() of the first stop signal
        self.ran_any = False
        self.t0 = time.monotonic()

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda s, _f: self.on_signal(s))

    def connect(self) -> None:
        """Starts (address null) or joins the Ray cluster every job joins."""
        if self.address is not None:
            return
        import ray

        from cluster.launch import connect

        try:
            self.started_ray = connect(self.plan.cluster)
        except ClusterError as e:
            raise ConfigError(str(e)) from None
        self.install_signal_handlers()  # ray.init installs its own SIGTERM handler
        addr = self.plan.cluster.address
        self.address = (
            addr if addr and addr.startswith("ray://") else (ray.get_runtime_context().gcs_address)
        )
        where = "started" if self.started_ray else "joined"
        print(f"sweep {self.plan.name}: Ray cluster {where} at {self.address}", flush=True)

    def check_fits(self, jobs: list[Job], cfgs: list[RootConfig]) -> None:
        from cluster.launch import check_capacity

        for job, cfg in zip(jobs, cfgs):
            try:
                check_capacity(cfg.cluster)
            except ClusterError as e:
                raise ConfigError(f"{job.where()}: {e}") from None

    def prepare_data(self, jobs: list[Job], cfgs: list[RootConfig]) -> None:
        """Each dataset once, here, before its jobs start (not by several jobs at once);
        idempotent: a prepared one is only checked against the job's model."""
        from data_pipeline.config import DataError
        from trainer.driver.run import prepare_data

        for job, cfg in zip(jobs, cfgs):
            if job.status == "finished":
                continue
            try:
                prepare_data(cfg)
            except (ConfigError, DataError) as e:
                raise ConfigError(f"{job.where()}: {e}") from None

    def run_batch(self, batch: Sequence[Sequence[str]], first: int) -> list[Job]:
        """Validates a batch, then runs its unfinished jobs, max_parallel at a time."""
        self._raise_if_stopped()
        jobs = self.record.make_jobs(batch, first)
        cfgs = self.plan.validate(jobs)
        if self.check:  # a local cluster's fit was checked with each job's config
            raise SweepChecked(self.plan, jobs)
        self.connect()
        self.check_fits(jobs, cfgs)
        self.prepare_data(jobs, cfgs)
        self._raise_if_stopped()
        todo = self._enter(jobs)
        self._run(todo)
        self._raise_if_stopped()
        return jobs

    def _raise_if_stopped(self) -> None:
        if self.stop_signum is not None:
            raise SweepStopped(self.stop_signum)

    def _enter(self, jobs: list[Job]) -> list[Job]:
        """Records a validated batch (a job that ended after the last save and finished is
        finished) and returns the jobs to run."""
        record = self.record
        record.created_at = record.created_at or utc_now()
        for job in jobs:
            record.jobs[job.num] = job
            if (
                job.status != "finished"
                and job.attempts
                and record.run_summary(job).get("finished")
            ):
                job.status, job.error = "finished", None  # ended after the last save
            if job.status != "finished":
                job.status = "pending"
        record.save()
        todo = [j for j in jobs if j.status != "finished"]
        done = len(jobs) - len(todo)
        print(
            f"sweep {self.plan.name}: {len(jobs)} job(s) validated"
            + (f", {done} already finished" if done else "")
            + f"; running {len(todo)}, {self.plan.max_parallel} at a time "
            f"(directory {self.plan.dir})",
            flush=True,
        )
        for job in jobs:
            if job.status == "finished":
                record.read_metrics(job)
        return todo

    def _run(self, todo: list[Job]) -> None:
        queue = list(todo)
        while queue or self.running:
            while queue and self.stop_signum is None and len(self.running) < self.plan.max_parallel:
                self._start(queue.pop(0))
            for r in list(self.running):
                if r.proc.poll() is not None:
                    self._end(r)
                elif self.stop_signum is not None and not r.signaled:
                    self._forward_stop(r)
                elif not r.armed:
                    r.armed = bool(catches_sigterm(r.proc.pid))
            if self.stop_signum is not None and not self.running:
                break
            time.sleep(POLL_S)

    def _start(self, job: Job) -> None:
        job.status, job.error, job.exit_code = "running", None, None
        job.started_at, job.ended_at, job.wall_s = utc_now(), None, None
        job.attempts += 1
        args = self.plan.job_args(job, self.address)
        print(f"sweep {self.plan.name}: job {job.num} {job.name} started: {job.label}", flush=True)
        r = JobProcess(job, args, self.record.log_path(job))
        self.running.append(r)
        self.ran_any = True
        job.pid = r.proc.pid
        self.record.save()

    def _end(self, r: JobProcess) -> None:
        rc = r.finish()
        self.running.remove(r)
        job = r.job
        summary = self.record.run_summary(job)
        job.exit_code = rc
        job.ended_at = utc_now()
        job.wall_s = round(time.monotonic() - r.t0, 3)
        job.status, job.error = classify(rc, summary, self.stop_signum is not None, r.error)
        self.record.read_metrics(job, summary)
        self.record.keep_log(job, r.log.name)
        self.record.save()
        tail = f": {job.error}" if job.error else ""
        print(
            f"sweep {self.plan.name}: job {job.num} {job.name} {job.status} "
            f"(exit {rc}, {job.wall_s:.1f} s){tail}",
            flush=True,
        )

    @staticmethod
    def value(job: Job) -> float:
        """What a sweeper optimises: the final val loss (NaN for a job without one)."""
        if job.status == "finished" and job.final_val_loss is not None:
            return job.final_val_loss
        return float("nan")

    # -- signals and the end -------------------------------------------------------------------
    def on_signal(self, signum: int) -> None:
        """SIGTERM/SIGINT: no new job starts; every running one is asked to checkpoint and
        stop (by _run, within FORWARD_DELAY_S). A second signal is passed on to every job at
        once: raygpt then stops without its checkpoint. The sweep raises SweepStopped once they
        have exited."""
        if self.stop_signum is None:
            self.stop_signum, self.stop_t = signum, time.monotonic()
            print(
                f"{signal.Signals(signum).name}: asking {len(self.running)} running job(s) to "
                "checkpoint and stop; run the same command again to resume",
                file=sys.stderr,
                flush=True,
            )
            return
        for r in self.running:
            r.signal(signal.SIGTERM)

    def _forward_stop(self, r: JobProcess) -> None:
        """Asks a running job to checkpoint and stop (SIGTERM: raygpt checkpoints at the next
        step boundary and exits 143) unless a SIGTERM already reached it. `ray job stop`
        signals the sweep and every process under it at once, and raygpt takes a second
        SIGTERM as "stop now, without the checkpoint": so the stop is passed on a moment after
        the sweep's own signal, and not to a job that had raygpt's handler and has it no more
        (its first SIGTERM came; it is checkpointing)."""
        if time.monotonic() - self.stop_t < FORWARD_DELAY_S:
            return
        if r.armed and catches_sigterm(r.proc.pid) is False:
            r.signaled = True
            return
        r.signal(signal.SIGTERM)

    def kill_all(self) -> None:
        for r in self.running:
            r.signal(signal.SIGKILL)
        for r in list(self.running):
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(timeout=30)
            r.finish()
            r.job.status, r.job.error = "stopped", "killed: the sweep ended while it ran"
            r.job.ended_at = utc_now()
        self.running.clear()

    def shutdown(self) -> None:
        """Kills any job still running and leaves (or stops) the Ray cluster it started."""
        self.kill_all()
        if self.started_ray:
            import ray

            ray.shutdown()
        self.record.drop_tmp_logs()

    def wall_s(self) -> float:
        return time.monotonic() - self.t0

    def exit_code(self) -> int:
        statuses = [j.status for j in self.record.jobs.values()]
        if self.stop_signum is not None:
            return 128 + self.stop_signum
        if "failed" in statuses:
            return 1
        if any(s != "finished" for s in statuses):
            return 143  # stopped on their own (stop_at_step, a SIGTERM of their own)
        return 0
