"""raygpt's Hydra launcher (hydra/launcher=raygpt): every sweeper's batches run through the
sweep's job runner (runner.py).

Hydra's sweepers, the basic grid/choice one and plugins such as hydra-optuna-sweeper alike,
hand their batches of job overrides to the configured launcher. This one validates each batch,
runs its jobs as their own raygpt runs on the sweep's Ray cluster, sweep.max_parallel at a
time, and returns one JobReturn per job whose return_value is the job's final val loss (NaN for
a job that did not finish: Optuna records it as a failed trial and goes on).

The launcher holds no sweep of its own: Hydra builds it and hands its setup the task function
that run_sweep gave Hydra (hydra_private.run_multirun), the SweepSession of multirun.py, whose
start(config) makes this invocation's SweepRunner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from trainer.driver.sweep import hydra_private

if TYPE_CHECKING:
    from trainer.driver.sweep.runner import SweepRunner

NAME = "raygpt"


class RaygptLauncher(Launcher):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.runner: Optional[SweepRunner] = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.runner = task_function.start(config)  # a SweepSession (multirun.py)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.runner is not None, "setup() runs first"
        jobs = self.runner.run_batch(job_overrides, initial_job_idx)
        return [
            JobReturn(
                overrides=list(job.overrides),
                cfg=self.config,
                working_dir=self.runner.plan.root,
                task_name=job.name,
                status=JobStatus.COMPLETED,
                _return_value=self.runner.value(job),
            )
            for job in jobs
        ]


def register() -> None:
    """Makes `hydra/launcher=raygpt` this launcher (idempotent)."""
    hydra_private.register_launcher(RaygptLauncher, NAME)
