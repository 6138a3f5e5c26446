"""A sweep's plan: what decides its jobs (its overrides and its sweeper's settings, and their
fingerprint), its names and directory, each job's name, label and command line, and each job's
config validated as its own run will validate it. Reads and writes nothing in run.root (the
sweep directory: record.py)."""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from cluster.config import ClusterConfig
from data_pipeline import storage
from trainer.config import ConfigError, RootConfig, SweepConfig, load_config
from trainer.driver.preflight import check_inputs
from trainer.driver.sweep import hydra_private

# May differ between invocations of one sweep (not part of its definition): how many jobs run
# at once, and where the Ray cluster is reached from (a sweep submitted with `ray job submit`,
# cluster.address=auto, is resumed by the same overrides run against that cluster's address).
RUNTIME_KEYS = ("sweep.max_parallel", "cluster.address")
# Set by the sweep for every job; a job's own value would be replaced.
JOB_KEYS = ("run.name", "run.group", "cluster.address")
# Sweeper settings that batch the same jobs differently (not part of the definition).
SWEEPER_RUNTIME = ("n_jobs", "max_batch_size")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def override_key(override: str) -> str:
    """'++optim.lr=1e-3' -> 'optim.lr'; 'model=gpt-tiny' -> 'model'."""
    return override.split("=", 1)[0].lstrip("~+")


def task_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides without Hydra's own (hydra.*, hydra/...)."""
    return [o for o in overrides if not override_key(o).startswith("hydra")]


def fixed_keys(sweep_overrides: Sequence[str]) -> set[str]:
    """The keys the command line sets to one value (not swept: no `a,b`, range(), choice(),
    interval(), ...). Hydra may write such a value differently in a job's overrides (1e11 ->
    100000000000.0), so they are told apart by key, not by text."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(task_overrides(sweep_overrides))
    except Exception:  # noqa: BLE001 - Hydra's grammar errors are reported where they matter
        return set()
    swept = {p.get_key_element().lstrip("~+") for p in parsed if p.is_sweep_override()}
    return {p.get_key_element().lstrip("~+") for p in parsed} - swept


def swept_label(job: Sequence[str], sweep_overrides: Sequence[str]) -> str:
    """The overrides that make this job: its swept values, and keys a sweeper plugin chose
    that the command line does not name."""
    given, fixed = set(sweep_overrides), fixed_keys(sweep_overrides)
    own = [
        o
        for o in job
        if o not in given and override_key(o) not in fixed and override_key(o) not in JOB_KEYS
    ]
    return " ".join(own) or "(no swept values)"


def defining(overrides: Sequence[str]) -> list[str]:
    """The overrides without the runtime settings (RUNTIME_KEYS)."""
    return [o for o in overrides if override_key(o) not in RUNTIME_KEYS]


def definition(overrides: Sequence[str], sweeper: dict[str, Any]) -> dict[str, Any]:
    """What decides a sweep's jobs: its overrides and its sweeper's settings."""
    return {
        "overrides": defining(overrides),
        "sweeper": {k: v for k, v in sweeper.items() if k not in SWEEPER_RUNTIME},
    }


def definition_change(then: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between two sweep definitions, in a few words."""
    old, new = list(then.get("overrides") or []), list(now.get("overrides") or [])
    gone, added = [o for o in old if o not in new], [o for o in new if o not in old]
    if gone or added:
        return f"then {' '.join(gone) or '-'}; now {' '.join(added) or '-'}"
    if old != new:
        return "the same overrides in another order: other job numbers"
    return f"other sweeper settings: then {then.get('sweeper')}; now {now.get('sweeper')}"


def fingerprint(defn: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(defn, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sweep_names(sweep_name: Optional[str], run_name: Optional[str], fp: str) -> tuple[str, str]:
    """(the sweep's name: its directory and W&B group, the prefix of its jobs' run names)."""
    name = sweep_name or (f"sweep-{run_name}" if run_name else f"sweep-{fp[:8]}")
    return name, run_name or name


@dataclass
class Job:
    num: int
    name: str  # its run.name: run.root/<name> is its run directory
    overrides: list[str]  # as the sweeper gave them
    label: str  # the swept values, for people
    status: str = "pending"  # one of record.STATUSES
    error: Optional[str] = None  # the job's last `error:` line
    started_at: Optional[str] = None  # the latest attempt, UTC ISO 8601
    ended_at: Optional[str] = None
    wall_s: Optional[float] = None
    exit_code: Optional[int] = None
    pid: Optional[int] = None  # of the latest attempt's `python -m trainer.train`
    attempts: int = 0
    final_val_loss: Optional[float] = None
    tokens_per_sec: Optional[float] = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def where(self) -> str:
        """How errors name the job: 'sweep job 1 (sw-1: optim.lr=2e-3)'."""
        return f"sweep job {self.num} ({self.name}: {self.label})"


@dataclass(frozen=True)
class SweepPlan:
    """One sweep as its command line defines it: names, directory, cluster, definition."""

    root: str  # run.root, absolute
    name: str  # the sweep's: its directory run.root/<name>, its W&B group by default
    base: str  # its jobs' run names are <base>-<n>
    group: str  # its jobs' W&B group (run.group)
    dir: str
    max_parallel: int
    cluster: ClusterConfig
    overrides: tuple[str, ...]  # the command line's task overrides
    defn: dict[str, Any]
    fingerprint: str
    run_name: Optional[str]  # run.name and sweep.name as given (None: not given)
    sweep_name: Optional[str]

    @classmethod
    def create(
        cls,
        *,
        root: str,
        sweep_name: Optional[str],
        run_name: Optional[str],
        run_group: Optional[str],
        max_parallel: int,
        cluster: ClusterConfig,
        overrides: Sequence[str],
        sweeper: dict[str, Any],
    ) -> SweepPlan:
        root = storage.absolute(root)
        defn = definition(overrides, sweeper)
        fp = fingerprint(defn)
        name, base = sweep_names(sweep_name, run_name, fp)
        return cls(
            root=root,
            name=name,
            base=base,
            group=run_group or name,
            dir=storage.join(root, name),
            max_parallel=max_parallel,
            cluster=cluster,
            overrides=tuple(overrides),
            defn=defn,
            fingerprint=fp,
            run_name=run_name,
            sweep_name=sweep_name,
        )

    @classmethod
    def from_hydra(cls, config: DictConfig) -> SweepPlan:
        """From the sweep's composed master config (swept keys at their defaults)."""
        raw = OmegaConf.to_container(config.sweep, resolve=True)
        try:
            sweep_cfg = SweepConfig(**raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"sweep: {e}") from None
        cluster_raw = OmegaConf.to_container(config.cluster, resolve=True)
        try:
            cluster = ClusterConfig(**cluster_raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cluster: {e}") from None
        return cls.create(
            root=str(config.run.root),
            sweep_name=sweep_cfg.name,
            run_name=config.run.name,
            run_group=config.run.group,
            max_parallel=sweep_cfg.max_parallel,
            cluster=cluster,
            overrides=OmegaConf.to_container(config.hydra.overrides.task, resolve=False),
            sweeper=OmegaConf.to_container(config.hydra.sweeper, resolve=False, enum_to_str=True),
        )

    def shared(self) -> dict[str, Any]:
        """The values every job has as the sweep has them (they cannot be swept)."""
        return {
            "run.root": self.root,
            "run.name": self.run_name,
            "sweep.name": self.sweep_name,
            "sweep.max_parallel": self.max_parallel,
        }

    def new_job(self, num: int, overrides: Sequence[str]) -> Job:
        return Job(
            num=num,
            name=f"{self.base}-{num}",
            overrides=list(overrides),
            label=swept_label(overrides, self.overrides),
        )

    def job_args(self, job: Job, address: Optional[str]) -> list[str]:
        """The job's command line; address None (validation): its own cluster.address kept."""
        own = (
            JOB_KEYS
            if address is not None
            else tuple(k for k in JOB_KEYS if k != "cluster.address")
        )
        args = [o for o in job.overrides if override_key(o) not in own]
        args += [f"run.name={job.name}", f"run.group={self.group}"]
        if address is not None:
            args.append(f"cluster.address='{address}'")
        return args

    def validate(self, jobs: list[Job]) -> list[RootConfig]:
        """Every job's config, validated as its own run will validate it (one line naming the
        job and the rule for the first bad one). Nothing is written."""
        return [self._validate(job) for job in jobs]

    def _validate(self, job: Job) -> RootConfig:
        try:
            cfg = load_config(self.job_args(job, None))
            check_inputs(cfg)
        except ConfigError as e:
            raise ConfigError(f"{job.where()}: {e}") from None
        got = {
            "run.root": cfg.run.root,
            "sweep.name": cfg.sweep.name,
            "sweep.max_parallel": cfg.sweep.max_parallel,
        }
        for key, want in self.shared().items():
            if key in got and got[key] != want:
                raise ConfigError(
                    f"{job.where()}: {key} ({got[key]}) differs from the sweep's ({want}): "
                    "it cannot be swept"
                )
        swept_name = [o for o in job.overrides if override_key(o) == "run.name"]
        if swept_name and swept_name[-1].split("=", 1)[1] != (self.run_name or ""):
            raise ConfigError(
                f"{job.where()}: run.name cannot be swept "
                "(the jobs are named <run.name>-<n>; name the sweep with sweep.name)"
            )
        if cfg.cluster.address != self.cluster.address:
            raise ConfigError(
                f"{job.where()}: cluster.address ({cfg.cluster.address}) differs from the "
                f"sweep's ({self.cluster.address}): every job joins the sweep's one Ray cluster"
            )
        return cfg


def expand_basic(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs of a basic (grid/choice) sweep, in Hydra's order; [] if it cannot tell."""
    try:
        return hydra_private.grid_jobs(task_overrides(overrides))
    except Exception:  # noqa: BLE001 - Hydra's grammar errors: reported as Hydra words them
        return []


def check_sweep(overrides: Sequence[str]) -> list[RootConfig]:
    """Every job of a basic (grid/choice) sweep, validated as its run will validate it, without
    Ray and without writing anything; [] for a sweeper plugin (hydra/sweeper=...), whose jobs
    are known only as it runs. Raises ConfigError naming the first bad job (locate_bad_job)."""
    if any(override_key(o) == "hydra/sweeper" for o in overrides):
        return []
    cfgs = []
    for num, job in enumerate(expand_basic(overrides)):
        try:
            cfg = load_config(job, default_name="sweep-check")
            check_inputs(cfg)
            cfgs.append(cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep job {num} ({swept_label(job, overrides)}): {e}") from None
    return cfgs


def locate_bad_job(overrides: Sequence[str]) -> Optional[str]:
    """For a composition error Hydra raised for a whole batch: the first job that fails, in
    the words a single run would use."""
    try:
        check_sweep(overrides)
    except ConfigError as e:
        return str(e)
    return None
