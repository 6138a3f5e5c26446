"""Hydra multirun: every job of a sweep is validated first, then each runs as its own run."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from trainer.config import CONF_DIR, ConfigError, load_config, to_root_config


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The override list of each job, in Hydra's basic-sweeper order."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's grammar errors
        raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from None
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def run_sweep(overrides: list[str]) -> int:
    jobs = expand_sweep(overrides)
    for job in jobs:  # fail before any job starts, not at job 7 of 8
        try:
            load_config(job, default_name="sweep-check")
        except ConfigError as e:
            raise ConfigError(f"sweep job {' '.join(job)}: {e}") from None
    print(f"sweep: {len(jobs)} job(s) validated")
    sys.argv = [sys.argv[0], "--multirun", *overrides]
    failures: list[int] = []

    @hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
    def job(cfg: DictConfig) -> None:
        from trainer.train import train

        hc = HydraConfig.get()
        sweep = Path(hc.sweep.dir).name
        base = cfg.run.name or cfg.model.name
        cfg.run.group = cfg.run.group or f"sweep-{sweep}"
        cfg.run.name = f"{base}-{sweep}-{hc.job.num}"
        rc = train(to_root_config(cfg))
        if rc:
            failures.append(hc.job.num)

    job()
    if failures:
        print(f"error: sweep jobs {failures} failed", file=sys.stderr)
        return 1
    return 0
