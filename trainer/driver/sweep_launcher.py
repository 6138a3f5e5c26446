"""raygpt's Hydra launcher (hydra/launcher=raygpt): every sweeper's batches run through the
sweep's parallel job runner (trainer/driver/sweep.py).

Hydra's sweepers, the basic grid/choice one and plugins such as hydra-optuna-sweeper alike,
hand their batches of job overrides to the configured launcher. This one validates each batch,
runs its jobs as their own raygpt runs on the sweep's Ray cluster, sweep.max_parallel at a
time, and returns one JobReturn per job whose return_value is the job's final val loss (NaN for
a job that did not finish: Optuna records it as a failed trial and goes on).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

NAME = "raygpt"
# Hydra instantiates a launcher only from its plugin namespace (hydra_plugins.*): this module is
# also importable as hydra_plugins.raygpt_launcher and its class registered under that name
# (Plugins.register), while the code stays here, next to the sweep it drives.
PLUGIN_MODULE = "hydra_plugins.raygpt_launcher"


@dataclass
class RaygptLauncherConf:
    _target_: str = f"{PLUGIN_MODULE}.RaygptLauncher"


class RaygptLauncher(Launcher):
    __module__ = PLUGIN_MODULE

    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from trainer.driver import sweep

        self.config = config
        self.sweep = sweep.start(config)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        jobs = self.sweep.run_batch(job_overrides, initial_job_idx)
        return [
            JobReturn(
                overrides=list(job.overrides),
                cfg=self.config,
                working_dir=self.sweep.root,
                task_name=job.name,
                status=JobStatus.COMPLETED,
                _return_value=self.sweep.value(job),
            )
            for job in jobs
        ]


def _register_plugin() -> None:
    try:
        importlib.import_module("hydra_plugins")
    except ImportError:  # no Hydra plugin package installed: an empty namespace
        ns = types.ModuleType("hydra_plugins")
        ns.__path__ = []
        sys.modules["hydra_plugins"] = ns
    sys.modules[PLUGIN_MODULE] = sys.modules[__name__]
    Plugins.instance().register(RaygptLauncher)


_register_plugin()
ConfigStore.instance().store(
    group="hydra/launcher", name=NAME, node=RaygptLauncherConf, provider="raygpt"
)
