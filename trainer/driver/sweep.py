"""Sweeps: `python -m trainer.train -m ...` runs its jobs in parallel on one Ray cluster.

Hydra's sweeper (the basic grid/choice sweeper, or a plugin such as Optuna) decides the jobs;
raygpt's launcher (trainer/driver/sweep_launcher.py) hands each batch of them to
`Sweep.run_batch`. Every job of a batch is validated first; then up to sweep.max_parallel of
them train at once, each its own process

    python -m trainer.train <job overrides> run.name=<base>-<n> run.group=<sweep>
                            cluster.address=<the sweep's Ray>

(its own TorchTrainer, placement group, run directory and W&B run, in the sweep's W&B group),
and the next starts as soon as any ends. The sweep starts (or joins) Ray once; every job joins
it. A failed job does not stop the others.

The sweep directory run.root/<sweep> (any storage URI) holds sweep.json (the definition and
its fingerprint, every job with its overrides, status, error line and times), logs/<run>.log,
and at the end summary.md, summary.json and compare.png. Running the same command again skips
the finished jobs and resumes the others from their checkpoints (same run.name); a directory
made by other overrides is refused (sweep.max_parallel and cluster.address may change). SIGTERM
asks every running job to checkpoint and stop (each exits 143), then the sweep exits 143; a job
that a SIGTERM already reached (`ray job stop` signals every process of a submitted sweep at
once) is not sent a second one, which would stop it without its checkpoint. SIGKILL of the
sweep takes its jobs with it. `python -m trainer.train --check -m ...` runs the checks only
(run_sweep(check=True)): no Ray, nothing read or written in run.root.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from cluster.config import ClusterConfig, ClusterError
from data_pipeline import storage
from trainer.config import CONF_DIR, ConfigError, RootConfig, SweepConfig, load_config

STATE_FILE = "sweep.json"
# May differ between invocations of one sweep (not part of its definition): how many jobs run
# at once, and where the Ray cluster is reached from (a sweep submitted with `ray job submit`,
# cluster.address=auto, is resumed by the same overrides run against that cluster's address).
RUNTIME_KEYS = ("sweep.max_parallel", "cluster.address")
# Set by the sweep for every job; a job's own value would be replaced.
JOB_KEYS = ("run.name", "run.group", "cluster.address")
# Sweeper settings that batch the same jobs differently (not part of the definition).
SWEEPER_RUNTIME = ("n_jobs", "max_batch_size")
STATUSES = ("pending", "running", "finished", "failed", "stopped")
POLL_S = 0.2
# A stop reaches the jobs this long after the sweep's first SIGTERM/SIGINT (see _forward_stop).
FORWARD_DELAY_S = 1.0


class SweepChecked(Exception):  # noqa: N818 - a way out of Hydra's sweep, not an error
    """--check: the first batch of jobs is validated; nothing ran, nothing was written."""

    def __init__(self, sweep: Sweep, jobs: list[Job]):
        super().__init__(f"{len(jobs)} job(s)")
        self.sweep, self.jobs = sweep, jobs


class SweepStopped(Exception):
    """SIGTERM/SIGINT: the running jobs checkpointed and stopped; the sweep exits 128+signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def override_key(override: str) -> str:
    """'++optim.lr=1e-3' -> 'optim.lr'; 'model=gpt-tiny' -> 'model'."""
    return override.split("=", 1)[0].lstrip("~+")


def fixed_keys(sweep_overrides: Sequence[str]) -> set[str]:
    """The keys the command line sets to one value (not swept: no `a,b`, range(), choice(),
    interval(), ...). Hydra may write such a value differently in a job's overrides (1e11 ->
    100000000000.0), so they are told apart by key, not by text."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = [o for o in sweep_overrides if not override_key(o).startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(task)
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


def definition(task_overrides: Sequence[str], sweeper: dict[str, Any]) -> dict[str, Any]:
    """What decides a sweep's jobs: its overrides and its sweeper's settings."""
    return {
        "overrides": defining(task_overrides),
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
    status: str = "pending"
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


def _number(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _libc_prctl():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:  # not glibc Linux: jobs are still killed on every exit but SIGKILL
        return None


_PRCTL = _libc_prctl()
PR_SET_PDEATHSIG = 1


def _die_with(parent: int):
    """preexec_fn: the job gets SIGKILL when the sweep process dies, even by SIGKILL (its own
    process group keeps it clear of the terminal's signals)."""
    prctl = _PRCTL

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the sweep died before prctl took hold
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def catches_sigterm(pid: int) -> Optional[bool]:
    """Whether process `pid` has a SIGTERM handler now (Linux /proc/<pid>/status SigCgt);
    None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


class Running:
    """One job's process, its output (echoed with a prefix, kept in its log) and error line."""

    def __init__(self, job: Job, args: list[str], log_path: str):
        self.job = job
        self.log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed in wait()
        self.log.write(f"# {utc_now()} python -m trainer.train {' '.join(args)}\n")
        self.error: Optional[str] = None
        self.signaled = False
        self.armed = False  # seen with a SIGTERM handler (raygpt's, while it trains)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.train", *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()),
        )
        self.threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, sys.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, sys.stderr), daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _pump(self, pipe, out) -> None:
        prefix = f"({self.job.name}) "
        for line in pipe:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
            self.log.write(f"{stamp} {line}")  # the log: each line with its UTC time
            if out is sys.stderr and line.startswith("error:"):
                self.error = line.strip()
            try:
                out.write(prefix + line)
                out.flush()
            except (OSError, ValueError):
                pass

    def signal(self, signum: int) -> None:
        self.signaled = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def finish(self) -> int:
        for t in self.threads:
            t.join(timeout=10)
        self.log.close()
        return self.proc.returncode


class Sweep:
    """One sweep: its directory, its jobs' states, the Ray cluster its jobs join."""

    def __init__(
        self,
        *,
        root: str,
        sweep_name: Optional[str],
        run_name: Optional[str],
        run_group: Optional[str],
        max_parallel: int,
        cluster: ClusterConfig,
        task_overrides: Sequence[str],
        sweeper: dict[str, Any],
        check: bool = False,
    ):
        self.check = check  # validate only: no Ray, no storage (python -m trainer.train --check)
        self.root = storage.absolute(root)
        self.defn = definition(task_overrides, sweeper)
        self.fingerprint = fingerprint(self.defn)
        self.name, self.base = sweep_names(sweep_name, run_name, self.fingerprint)
        self.group = run_group or self.name
        self.dir = storage.join(self.root, self.name)
        self.max_parallel = max_parallel
        self.cluster = cluster
        self.task_overrides = list(task_overrides)
        self.shared = {
            "run.root": self.root,
            "run.name": run_name,
            "sweep.name": sweep_name,
            "sweep.max_parallel": max_parallel,
        }
        self.jobs: dict[int, Job] = {}
        self.stored: dict[int, Job] = {}
        self.created_at: Optional[str] = None
        self.address: Optional[str] = None
        self.started_ray = False
        self.running: list[Running] = []
        self.stop_signum: Optional[int] = None
        self.stop_t = 0.0  # time.monotonic() of the first stop signal
        self.ran_any = False
        self.t0 = time.monotonic()
        self._tmp_logs: Optional[str] = None
        if not check:
            self._load()

    @classmethod
    def from_hydra(cls, config: DictConfig, check: bool = False) -> Sweep:
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
        task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
        sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False, enum_to_str=True)
        return cls(
            root=str(config.run.root),
            sweep_name=sweep_cfg.name,
            run_name=config.run.name,
            run_group=config.run.group,
            max_parallel=sweep_cfg.max_parallel,
            cluster=cluster,
            task_overrides=task,
            sweeper=sweeper,
            check=check,
        )

    # -- the sweep directory -------------------------------------------------------------------
    def _load(self) -> None:
        """Reads an earlier invocation's state; a directory of another sweep is refused."""
        state_uri = storage.join(self.dir, STATE_FILE)
        try:
            try:
                text = storage.read_text(state_uri)
            except FileNotFoundError:
                if storage.exists(self.dir) and storage.listdir(self.dir):
                    raise ConfigError(
                        f"sweep '{self.name}': {self.dir} exists and is not a sweep directory "
                        f"(no {STATE_FILE}): choose another sweep.name"
                    ) from None
                return
        except storage.StorageError as e:  # run.root unreachable: bad input, before any job
            raise ConfigError(f"run.root: {e}") from None
        try:
            state = json.loads(text)
            saved_fp = state["fingerprint"]
            jobs = [Job.from_dict(j) for j in state.get("jobs", [])]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"sweep '{self.name}': unreadable {state_uri}: {e}") from None
        if saved_fp != self.fingerprint:
            raise ConfigError(
                f"sweep '{self.name}' in {self.dir} was made by another sweep definition "
                f"({definition_change(state.get('definition') or {}, self.defn)}): choose "
                "another sweep.name (or run.name), or remove that directory"
            )
        self.created_at = state.get("created_at")
        self.stored = {j.num: j for j in jobs}

    def save(self) -> None:
        jobs = {**self.stored, **self.jobs}
        state = {
            "sweep": self.name,
            "fingerprint": self.fingerprint,
            "definition": self.defn,
            "group": self.group,
            "run_root": self.root,
            "created_at": self.created_at,
            "updated_at": utc_now(),
            "jobs": [asdict(jobs[n]) for n in sorted(jobs)],
        }
        text = json.dumps(state, indent=1, default=str) + "\n"
        storage.write_text(storage.join(self.dir, STATE_FILE), text)

    def run_summary(self, job: Job) -> dict[str, Any]:
        try:
            return json.loads(storage.read_text(storage.join(self.root, job.name, "summary.json")))
        except (OSError, ValueError):
            return {}

    # -- a batch of jobs -----------------------------------------------------------------------
    def make_jobs(self, batch: Sequence[Sequence[str]], first: int) -> list[Job]:
        jobs = []
        for i, overrides in enumerate(batch):
            num = first + i
            job = Job(
                num=num,
                name=f"{self.base}-{num}",
                overrides=list(overrides),
                label=swept_label(overrides, self.task_overrides),
            )
            old = self.stored.get(num)
            if old is not None:
                if defining(old.overrides) != defining(job.overrides):
                    raise ConfigError(
                        f"sweep job {num} ({job.name}): the sweeper now asks for {job.label}, "
                        f"the stored job in {self.dir} ran {old.label}: a sweeper without a "
                        "fixed seed (e.g. hydra.sweeper.sampler.seed=1)? or choose another "
                        "sweep.name"
                    )
                old.overrides = job.overrides  # this invocation's runtime settings
                job = old
            jobs.append(job)
        return jobs

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
        cfgs = []
        for job in jobs:
            try:
                cfg = load_config(self.job_args(job, None))
            except ConfigError as e:
                raise ConfigError(f"sweep job {job.num} ({job.name}: {job.label}): {e}") from None
            got = {
                "run.root": cfg.run.root,
                "sweep.name": cfg.sweep.name,
                "sweep.max_parallel": cfg.sweep.max_parallel,
            }
            for key, want in self.shared.items():
                if key in got and got[key] != want:
                    raise ConfigError(
                        f"sweep job {job.num} ({job.name}: {job.label}): {key} ({got[key]}) "
                        f"differs from the sweep's ({want}): it cannot be swept"
                    )
            swept_name = [o for o in job.overrides if override_key(o) == "run.name"]
            if swept_name and swept_name[-1].split("=", 1)[1] != (self.shared["run.name"] or ""):
                raise ConfigError(
                    f"sweep job {job.num} ({job.name}: {job.label}): run.name cannot be swept "
                    "(the jobs are named <run.name>-<n>; name the sweep with sweep.name)"
                )
            if cfg.cluster.address != self.cluster.address:
                raise ConfigError(
                    f"sweep job {job.num} ({job.name}: {job.label}): cluster.address "
                    f"({cfg.cluster.address}) differs from the sweep's ({self.cluster.address}): "
                    "every job joins the sweep's one Ray cluster"
                )
            cfgs.append(cfg)
        return cfgs

    def connect(self) -> None:
        """Starts (address null) or joins the Ray cluster every job joins."""
        if self.address is not None:
            return
        import ray

        from cluster.launch import connect

        try:
            self.started_ray = connect(self.cluster)
        except ClusterError as e:
            raise ConfigError(str(e)) from None
        install_signal_handlers(self)  # ray.init installs its own SIGTERM handler
        addr = self.cluster.address
        self.address = (
            addr if addr and addr.startswith("ray://") else (ray.get_runtime_context().gcs_address)
        )
        where = "started" if self.started_ray else "joined"
        print(f"sweep {self.name}: Ray cluster {where} at {self.address}", flush=True)

    def check_fits(self, jobs: list[Job], cfgs: list[RootConfig]) -> None:
        from cluster.launch import check_capacity

        for job, cfg in zip(jobs, cfgs):
            try:
                check_capacity(cfg.cluster)
            except ClusterError as e:
                raise ConfigError(f"sweep job {job.num} ({job.name}: {job.label}): {e}") from None

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
                raise ConfigError(f"sweep job {job.num} ({job.name}: {job.label}): {e}") from None

    def run_batch(self, batch: Sequence[Sequence[str]], first: int) -> list[Job]:
        """Validates a batch, then runs its unfinished jobs, max_parallel at a time."""
        if self.stop_signum is not None:
            raise SweepStopped(self.stop_signum)
        jobs = self.make_jobs(batch, first)
        cfgs = self.validate(jobs)
        if self.check:  # a local cluster's fit was checked with each job's config
            raise SweepChecked(self, jobs)
        self.connect()
        self.check_fits(jobs, cfgs)
        self.prepare_data(jobs, cfgs)
        if self.stop_signum is not None:
            raise SweepStopped(self.stop_signum)
        self.created_at = self.created_at or utc_now()
        for job in jobs:
            self.jobs[job.num] = job
            if job.status != "finished" and job.attempts and self.run_summary(job).get("finished"):
                job.status, job.error = "finished", None  # ended after the last save
            if job.status != "finished":
                job.status = "pending"
        self.save()
        todo = [j for j in jobs if j.status != "finished"]
        done = len(jobs) - len(todo)
        print(
            f"sweep {self.name}: {len(jobs)} job(s) validated"
            + (f", {done} already finished" if done else "")
            + f"; running {len(todo)}, {self.max_parallel} at a time (directory {self.dir})",
            flush=True,
        )
        for job in jobs:
            if job.status == "finished":
                self._read_metrics(job)
        self._run(todo)
        if self.stop_signum is not None:
            raise SweepStopped(self.stop_signum)
        return jobs

    def _log_path(self, job: Job) -> str:
        if storage.is_remote(self.dir):
            self._tmp_logs = self._tmp_logs or tempfile.mkdtemp(prefix="raygpt-sweep-logs-")
            return os.path.join(self._tmp_logs, f"{job.name}.log")
        os.makedirs(storage.join(self.dir, "logs"), exist_ok=True)
        return storage.join(self.dir, "logs", f"{job.name}.log")

    def _run(self, todo: list[Job]) -> None:
        queue = list(todo)
        while queue or self.running:
            while queue and self.stop_signum is None and len(self.running) < self.max_parallel:
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
        args = self.job_args(job, self.address)
        print(f"sweep {self.name}: job {job.num} {job.name} started: {job.label}", flush=True)
        r = Running(job, args, self._log_path(job))
        self.running.append(r)
        self.ran_any = True
        job.pid = r.proc.pid
        self.save()

    def _end(self, r: Running) -> None:
        rc = r.finish()
        self.running.remove(r)
        job = r.job
        summary = self.run_summary(job)
        job.exit_code = rc
        job.ended_at = utc_now()
        job.wall_s = round(time.monotonic() - r.t0, 3)
        job.status, job.error = classify(rc, summary, self.stop_signum is not None, r.error)
        self._read_metrics(job, summary)
        if storage.is_remote(self.dir):
            with contextlib.suppress(OSError):
                storage.upload(r.log.name, storage.join(self.dir, "logs", f"{job.name}.log"))
        self.save()
        tail = f": {job.error}" if job.error else ""
        print(
            f"sweep {self.name}: job {job.num} {job.name} {job.status} "
            f"(exit {rc}, {job.wall_s:.1f} s){tail}",
            flush=True,
        )

    def _read_metrics(self, job: Job, summary: Optional[dict[str, Any]] = None) -> None:
        summary = self.run_summary(job) if summary is None else summary
        job.final_val_loss = _number(summary.get("final_val_loss"))
        # training tokens/s (eval and checkpoint time left out); older runs: tokens_per_sec
        job.tokens_per_sec = _number(
            summary.get("train_tokens_per_sec", summary.get("tokens_per_sec"))
        )

    def value(self, job: Job) -> float:
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

    def _forward_stop(self, r: Running) -> None:
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

    def close(self, hydra_dir: Optional[str]) -> None:
        self.kill_all()
        if self.started_ray:
            import ray

            ray.shutdown()
        if self._tmp_logs:
            shutil.rmtree(self._tmp_logs, ignore_errors=True)
        if not self.jobs:
            return
        for n in ("multirun.yaml", "optimization_results.yaml"):
            if hydra_dir and os.path.isfile(os.path.join(hydra_dir, n)):
                with contextlib.suppress(OSError):
                    storage.upload(os.path.join(hydra_dir, n), storage.join(self.dir, n))
        self.save()
        report(self, time.monotonic() - self.t0)

    def exit_code(self) -> int:
        statuses = [j.status for j in self.jobs.values()]
        if self.stop_signum is not None:
            return 128 + self.stop_signum
        if "failed" in statuses:
            return 1
        if any(s != "finished" for s in statuses):
            return 143  # stopped on their own (stop_at_step, a SIGTERM of their own)
        return 0


# -- the report ----------------------------------------------------------------------------------
def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table_rows(sweep: Sweep) -> list[dict[str, Any]]:
    return [asdict(sweep.jobs[n]) for n in sorted(sweep.jobs)]


def markdown_table(sweep: Sweep) -> str:
    lines = [
        "| job | run | overrides | status | final val loss | tokens/s | wall s | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for j in (sweep.jobs[n] for n in sorted(sweep.jobs)):
        lines.append(
            f"| {j.num} | {j.name} | {j.label} | {j.status} | {_fmt(j.final_val_loss, '.4f')} | "
            f"{_fmt(j.tokens_per_sec, ',.0f')} | {_fmt(j.wall_s, '.1f')} | "
            f"{(j.error or '').replace('|', '/')} |"
        )
    return "\n".join(lines)


def compare_png(sweep: Sweep) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = [sweep.jobs[n] for n in sorted(sweep.jobs)]
    colors = {"finished": "tab:green", "failed": "tab:red"}
    xs = list(range(len(jobs)))
    labels = [f"{j.num}\n{j.label}" for j in jobs]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(jobs) + 3), 4.5), squeeze=False)
    for ax, key, title in zip(
        axes[0], ("final_val_loss", "tokens_per_sec"), ("final val loss", "training tokens/s")
    ):
        vals = [getattr(j, key) for j in jobs]
        have = [v for v in vals if v is not None]
        if key == "final_val_loss":  # close values: points on a zoomed axis, not bars from 0
            ax.scatter(
                [x for x, v in zip(xs, vals) if v is not None],
                have,
                color=[
                    colors.get(j.status, "tab:gray") for j, v in zip(jobs, vals) if v is not None
                ],
                zorder=3,
            )
            if have:
                pad = (max(have) - min(have)) * 0.15 or abs(have[0]) * 0.02 or 0.1
                ax.set_ylim(min(have) - pad, max(have) + pad)
        else:
            ax.bar(
                xs, [v or 0.0 for v in vals], color=[colors.get(j.status, "tab:gray") for j in jobs]
            )
            ax.set_ylim(0, max(have, default=1.0) * 1.15)
        for x, j, v in zip(xs, jobs, vals):
            text = j.status if v is None else f"{v:.4f}" if key == "final_val_loss" else f"{v:,.0f}"
            y = v if v is not None else ax.get_ylim()[0]
            ax.annotate(
                text,
                (x, y),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 4),
                textcoords="offset points",
            )
        ax.set_title(title)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_xlim(-0.6, len(jobs) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"sweep {sweep.name} (green finished, red failed, gray not finished)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def report(sweep: Sweep, wall_s: float) -> None:
    """Prints the comparison and writes summary.md, summary.json and compare.png."""
    table = markdown_table(sweep)
    counts = {s: sum(j.status == s for j in sweep.jobs.values()) for s in STATUSES}
    line = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    done = [
        j for j in sweep.jobs.values() if j.status == "finished" and j.final_val_loss is not None
    ]
    best = min(done, key=lambda j: j.final_val_loss) if done else None
    best_line = (
        f"best: job {best.num} {best.name} ({best.label}), final val loss {best.final_val_loss:.4f}"
        if best
        else "best: none finished"
    )
    head = f"sweep {sweep.name}: {line} in {wall_s:.1f} s; {best_line}"
    text = f"# {head}\n\n{table}\n\nfiles: {sweep.dir}\n"
    storage.write_text(storage.join(sweep.dir, "summary.md"), text)
    summary = {
        "sweep": sweep.name,
        "dir": sweep.dir,
        "fingerprint": sweep.fingerprint,
        "group": sweep.group,
        "wall_s": round(wall_s, 3),
        "counts": {s: n for s, n in counts.items() if n},
        "best": best.name if best else None,
        "jobs": table_rows(sweep),
    }
    storage.write_text(storage.join(sweep.dir, "summary.json"), json.dumps(summary, indent=1))
    try:
        storage.write_bytes(storage.join(sweep.dir, "compare.png"), compare_png(sweep))
    except Exception as e:  # noqa: BLE001 - the plot is a convenience; the table is the record
        print(f"sweep {sweep.name}: no compare.png ({e})", file=sys.stderr)
    print(f"\n{head}\n{table}\nwritten: summary.md, summary.json, compare.png in {sweep.dir}")
    for j in (sweep.jobs[n] for n in sorted(sweep.jobs)):
        if j.status == "failed":
            print(
                f"error: sweep job {j.num} ({j.name}: {j.label}) failed: {j.error}", file=sys.stderr
            )


# -- the entry point -----------------------------------------------------------------------------
_active: Optional[Sweep] = None


def active() -> Optional[Sweep]:
    return _active


_check = False  # this invocation only validates (run_sweep(check=True))


def start(config: DictConfig) -> Sweep:
    """Called by the launcher's setup with the master config: the sweep of this invocation."""
    global _active
    if _active is None:
        _active = Sweep.from_hydra(config, check=_check)
        install_signal_handlers(_active)
    return _active


def install_signal_handlers(sweep: Sweep) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _f: sweep.on_signal(s))


@contextlib.contextmanager
def _signals_restored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _not_called(cfg: DictConfig) -> None:
    raise AssertionError("raygpt's launcher runs jobs as processes, never this function")


def hydra_error_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0].rstrip(".") if text else type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip():
        c = str(cause).strip().splitlines()[0]
        if c not in first:
            first = f"{first}: {c}"
    return first


def expand_basic(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs of a basic (grid/choice) sweep, in Hydra's order; [] if it cannot tell."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = [o for o in overrides if not override_key(o).startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(task)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except Exception:  # noqa: BLE001 - Hydra's grammar errors: reported as Hydra words them
        return []
    return [list(job) for batch in batches for job in batch]


def check_sweep(overrides: Sequence[str]) -> list[RootConfig]:
    """Every job of a basic (grid/choice) sweep, validated as its run will validate it, without
    Ray and without writing anything; [] for a sweeper plugin (hydra/sweeper=...), whose jobs
    are known only as it runs. Raises ConfigError naming the first bad job (locate_bad_job)."""
    if any(override_key(o) == "hydra/sweeper" for o in overrides):
        return []
    cfgs = []
    for num, job in enumerate(expand_basic(overrides)):
        try:
            cfgs.append(load_config(job, default_name="sweep-check"))
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


def run_sweep(overrides: list[str], *, check: bool = False) -> int:
    """`python -m trainer.train -m <overrides>`: returns the exit code; raises ConfigError
    (one line, before any job starts) on bad input.

    check (`--check -m`): the sweep's own checks and nothing else: the sweeper expands its
    (first) batch of jobs, every job's config is validated as its run will validate it, a job
    that cannot fit a local cluster is refused; no Ray, nothing read or written in run.root
    (the sweep directory is checked when the sweep runs). Prints `ok: {...}` (JSON: the sweep's
    name, directory, job count, cluster.address) and returns 0."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from trainer.driver import sweep_launcher

    global _active, _check
    for o in overrides:
        if override_key(o) in ("hydra/launcher", "hydra.sweep.dir"):
            raise ConfigError(
                f"{o}: raygpt sweeps run through their own launcher and directory "
                "(run.root/<sweep.name>); set sweep.max_parallel for parallelism"
            )
    hydra_dir = tempfile.mkdtemp(prefix="raygpt-sweep-")
    _active, _check = None, check
    code = 0
    try:
        with _signals_restored():
            try:
                hydra = Hydra(
                    task_name="trainer.train",
                    config_loader=ConfigLoaderImpl(create_config_search_path(str(CONF_DIR))),
                )
                hydra.multirun(
                    config_name="config",
                    task_function=_not_called,
                    overrides=[
                        *overrides,
                        f"hydra/launcher={sweep_launcher.NAME}",
                        f"hydra.sweep.dir={hydra_dir}",
                    ],
                )
            except SweepStopped as e:
                code = e.exit_code
            except SweepChecked as e:
                print_check(e.sweep, e.jobs)
            except ConfigError:
                raise
            except (HydraException, OmegaConfBaseException) as e:
                if _active is None or not _active.ran_any:
                    where = locate_bad_job(overrides)
                    raise ConfigError(where or f"sweep: {hydra_error_line(e)}") from None
                print(f"error: sweep: {hydra_error_line(e)}", file=sys.stderr)
                code = 1
            except Exception as e:  # noqa: BLE001 - Ray failing to start, a sweeper failing
                from trainer.driver.errors import explain

                print(f"error: sweep: {explain(e)}", file=sys.stderr)
                code = 1
            finally:
                if _active is not None:
                    try:
                        _active.close(hydra_dir)
                    except Exception as e:  # noqa: BLE001 - e.g. the sweep directory unreachable
                        from trainer.driver.errors import explain

                        print(
                            f"error: sweep: writing its files failed: {explain(e)}", file=sys.stderr
                        )
                        code = code or 1
        sweep = _active
        if sweep is None:
            return code
        return code or sweep.exit_code()
    finally:
        _active, _check = None, False
        shutil.rmtree(hydra_dir, ignore_errors=True)


def print_check(sweep: Sweep, jobs: list[Job]) -> None:
    """--check's answer: one line for people, then `ok: {json}` for cluster/submit.py."""
    plugin = "basic" not in str(sweep.defn["sweeper"].get("_target_", "basic")).lower()
    what = "the sweeper's first batch: " if plugin else ""
    print(
        f"sweep {sweep.name}: {what}{len(jobs)} job(s) valid, {sweep.max_parallel} at a time; "
        f"directory {sweep.dir} (not read: checked when the sweep runs)"
    )
    info = {
        "sweep": sweep.name,
        "dir": sweep.dir,
        "jobs": len(jobs),
        "run.root": sweep.root,
        "cluster.address": sweep.cluster.address,
    }
    print("ok: " + json.dumps(info), flush=True)
