"""The run plan: where the run resumes from (the latest verified checkpoint, checked against
this config) and whether that checkpoint must be converted for a new layout. plan_run only
reads; apply changes the run directory and is called once everything is validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from trainer.checkpoint import index, universal
from trainer.checkpoint.compat import check_resume_compatible
from trainer.checkpoint.format import read_trainer_state
from trainer.config import RootConfig


@dataclass(frozen=True)
class RunPlan:
    resume_from: Optional[str]  # checkpoint URI, or None for a fresh start
    saved_cfg: Optional[dict[str, Any]]
    convert: bool  # resume_from must become a universal checkpoint (another DP size/stage)


def plan_run(cfg: RootConfig) -> RunPlan:
    resume_from = check_resume_compatible(cfg)
    saved_cfg = read_trainer_state(resume_from).get("config") if resume_from else None
    convert = bool(resume_from and saved_cfg and universal.plan(cfg, resume_from, saved_cfg))
    return RunPlan(resume_from, saved_cfg, convert)


def apply(cfg: RootConfig, run_plan: RunPlan) -> Optional[dict[str, str]]:
    """Makes the run directory agree with its checkpoint index (trainer/checkpoint/index.py's
    repair) and converts the checkpoint if needed; returns what the workers need to load a
    converted checkpoint (None if none)."""
    index.repair(cfg.run_uri)
    if not run_plan.convert:
        return None
    return universal.prepare(cfg, run_plan.resume_from, run_plan.saved_cfg)
