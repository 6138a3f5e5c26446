"""The sweep directory run.root/<sweep> (any storage URI): sweep.json (the definition and its
fingerprint, every job with its overrides, status, error line and times) and logs/<run>.log,
read back by the next invocation of the same sweep, which refuses a directory made by another
sweep definition. Also reads each job's own run summary (run.root/<run>/summary.json)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Optional

from data_pipeline import storage
from data_pipeline.lease import LEASE_FILE
from trainer.config import ConfigError
from trainer.driver.sweep.plan import Job, SweepPlan, defining, definition_change, utc_now

STATE_FILE = "sweep.json"
STATUSES = ("pending", "running", "finished", "failed", "stopped")


def _number(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class SweepRecord:
    """The jobs of one sweep and its directory: this invocation's jobs and an earlier one's."""

    def __init__(self, plan: SweepPlan):
        self.plan = plan
        self.jobs: dict[int, Job] = {}  # this invocation's, by number
        self.stored: dict[int, Job] = {}  # an earlier invocation's, from sweep.json
        self.created_at: Optional[str] = None
        self._tmp_logs: Optional[str] = None  # logs of a remote sweep directory, until uploaded

    @classmethod
    def load(cls, plan: SweepPlan) -> SweepRecord:
        """The record in plan.dir (empty if there is none); a directory of another sweep, or
        one that is not a sweep's, is refused (ConfigError)."""
        record = cls(plan)
        state_uri = storage.join(plan.dir, STATE_FILE)
        try:
            try:
                text = storage.read_text(state_uri)
            except FileNotFoundError:
                # A lease left by a killed sweep is no sign of another kind of directory.
                if storage.exists(plan.dir) and set(storage.listdir(plan.dir)) - {LEASE_FILE}:
                    raise ConfigError(
                        f"sweep '{plan.name}': {plan.dir} exists and is not a sweep directory "
                        f"(no {STATE_FILE}): choose another sweep.name"
                    ) from None
                return record
        except storage.StorageError as e:  # run.root unreachable: bad input, before any job
            raise ConfigError(f"run.root: {e}") from None
        try:
            state = json.loads(text)
            saved_fp = state["fingerprint"]
            jobs = [Job.from_dict(j) for j in state.get("jobs", [])]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"sweep '{plan.name}': unreadable {state_uri}: {e}") from None
        if saved_fp != plan.fingerprint:
            raise ConfigError(
                f"sweep '{plan.name}' in {plan.dir} was made by another sweep definition "
                f"({definition_change(state.get('definition') or {}, plan.defn)}): choose "
                "another sweep.name (or run.name), or remove that directory"
            )
        record.created_at = state.get("created_at")
        record.stored = {j.num: j for j in jobs}
        return record

    def save(self) -> None:
        plan = self.plan
        jobs = {**self.stored, **self.jobs}
        state = {
            "sweep": plan.name,
            "fingerprint": plan.fingerprint,
            "definition": plan.defn,
            "group": plan.group,
            "run_root": plan.root,
            "created_at": self.created_at,
            "updated_at": utc_now(),
            "jobs": [asdict(jobs[n]) for n in sorted(jobs)],
        }
        text = json.dumps(state, indent=1, default=str) + "\n"
        storage.write_text(storage.join(plan.dir, STATE_FILE), text)

    def sorted_jobs(self) -> list[Job]:
        return [self.jobs[n] for n in sorted(self.jobs)]

    def make_jobs(self, batch: Sequence[Sequence[str]], first: int) -> list[Job]:
        """The jobs of a sweeper's batch: a job an earlier invocation stored under the same
        number is that job (refused if the sweeper now asks for other values)."""
        jobs = []
        for i, overrides in enumerate(batch):
            job = self.plan.new_job(first + i, overrides)
            old = self.stored.get(job.num)
            if old is not None:
                if defining(old.overrides) != defining(job.overrides):
                    raise ConfigError(
                        f"sweep job {job.num} ({job.name}): the sweeper now asks for "
                        f"{job.label}, the stored job in {self.plan.dir} ran {old.label}: a "
                        "sweeper without a fixed seed (e.g. hydra.sweeper.sampler.seed=1)? or "
                        "choose another sweep.name"
                    )
                old.overrides = job.overrides  # this invocation's runtime settings
                job = old
            jobs.append(job)
        return jobs

    def run_summary(self, job: Job) -> dict[str, Any]:
        try:
            uri = storage.join(self.plan.root, job.name, "summary.json")
            return json.loads(storage.read_text(uri))
        except (OSError, ValueError):
            return {}

    def read_metrics(self, job: Job, summary: Optional[dict[str, Any]] = None) -> None:
        summary = self.run_summary(job) if summary is None else summary
        job.final_val_loss = _number(summary.get("final_val_loss"))
        # training tokens/s (eval and checkpoint time left out); older runs: tokens_per_sec
        job.tokens_per_sec = _number(
            summary.get("train_tokens_per_sec", summary.get("tokens_per_sec"))
        )

    def log_path(self, job: Job) -> str:
        """A local file for the job's log: in the sweep directory, or (remote) a temporary one
        that keep_log uploads."""
        if storage.is_remote(self.plan.dir):
            self._tmp_logs = self._tmp_logs or tempfile.mkdtemp(prefix="raygpt-sweep-logs-")
            return os.path.join(self._tmp_logs, f"{job.name}.log")
        os.makedirs(storage.join(self.plan.dir, "logs"), exist_ok=True)
        return storage.join(self.plan.dir, "logs", f"{job.name}.log")

    def keep_log(self, job: Job, path: str) -> None:
        if storage.is_remote(self.plan.dir):
            with contextlib.suppress(OSError):
                storage.upload(path, storage.join(self.plan.dir, "logs", f"{job.name}.log"))

    def keep_hydra_files(self, hydra_dir: Optional[str]) -> None:
        """Hydra's record of the sweep (and Optuna's results) into the sweep directory."""
        for n in ("multirun.yaml", "optimization_results.yaml"):
            if hydra_dir and os.path.isfile(os.path.join(hydra_dir, n)):
                with contextlib.suppress(OSError):
                    storage.upload(os.path.join(hydra_dir, n), storage.join(self.plan.dir, n))

    def drop_tmp_logs(self) -> None:
        if self._tmp_logs:
            shutil.rmtree(self._tmp_logs, ignore_errors=True)
