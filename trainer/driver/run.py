"""One training run, driven from the submitting machine: check, plan, prepare, fit, read back.

Reads the run's results from Ray's Result and from the run directory in storage (any URI),
never from this machine's disk.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import TYPE_CHECKING, Any, Optional

from cluster.config import ClusterError
from data_pipeline import storage
from trainer import precision
from trainer.config import (
    ConfigError,
    RootConfig,
    check_eval_fits,
    check_vocab_fits,
    config_warnings,
)
from trainer.driver import plan, preflight
from trainer.startup_trace import mark
from trainer.worker.entry import WorkerConfig

if TYPE_CHECKING:
    from data_pipeline.manifest import Manifest
    from data_pipeline.prepare import PlannedPrepare


def run_training(cfg: RootConfig, *, progress_bar: bool = False) -> dict[str, Any]:
    """Trains on Ray, or in this process (cluster.launch); returns the run's summary. The
    caller has validated `cfg`.

    progress_bar: draw a live bar on this (driver) terminal; otherwise rank 0 prints lines.
    """
    import sys

    from cluster.fit import FitOptions, fit
    from cluster.launch import connected
    from trainer.worker.entry import train_worker

    mark("driver: config valid")
    if cfg.cluster.in_process:
        from cluster.inprocess import reexec_for_allocator

        reexec_for_allocator(cfg.cluster)  # before any work: the command restarts with it
    for line in config_warnings(cfg):
        print(line, file=sys.stderr, flush=True)
    cfg = precision.resolve_before_ray(cfg)  # precision=auto: a resume's, or this machine's
    preflight.check_before_ray(cfg)
    with run_lease(cfg):  # one driver per run directory, until this run ends
        # uploads left unfinished under the run are a dead writer's (a kill -9 mid-upload)
        storage.abort_uploads([cfg.run_uri.rstrip("/") + "/"], under=True)
        run_plan = plan.plan_run(cfg)
        data = plan_data(cfg)
        job_env = storage.remote_env(other_machines=True)
        try:
            with connected(cfg.cluster, job_env=job_env):  # no Ray for an in-process run
                mark("driver: ray up")
                if not cfg.cluster.in_process:
                    preflight.check_cluster(cfg)
                    cfg = precision.resolve_on_cluster(cfg)  # still auto: a worker node's hardware
                config = _worker_config(cfg, run_plan, data, progress_bar)
                mark("driver: fit")
                with _progress(cfg, progress_bar):
                    fit(train_worker, config, FitOptions(cfg.cluster, cfg.run_uri, job_env))
            mark("driver: fit returned")
        except ClusterError as e:
            raise ConfigError(str(e)) from None
        mark("driver: ray down")
        return read_summary(cfg, config.invocation)


def run_lease(cfg: RootConfig):
    """The run directory's lease (data_pipeline/lease.py), held by this driver for the whole
    run: a second training of the same run.root + run.name is refused in one line (LeaseHeld,
    a StorageError: exit 2) before it reads or writes anything there. Ray Train's restarts of
    the workers happen under it; the workers never touch it."""
    from data_pipeline.lease import dir_lease

    return dir_lease(
        cfg.run_uri,
        f"run {cfg.run.name!r} ({cfg.run_uri})",
        remedy="stop it (Ctrl-C, SIGTERM or `ray job stop`: it checkpoints first), or choose "
        "another run.name",
    )


def _worker_config(
    cfg: RootConfig, run_plan: plan.RunPlan, data: Optional[PlannedPrepare], progress_bar: bool
) -> WorkerConfig:
    """Prepares (or checks) the data as `data` (plan_data) planned, readies the run directory
    and returns what every worker gets."""
    data_dir = prepare_data(cfg, data)
    mark("driver: data checked")
    # Validated, data included: from here on the run directory may change.
    universal = plan.apply(cfg, run_plan)
    write_run_config(cfg)
    return WorkerConfig(
        cfg=cfg,
        data_dir=data_dir,
        invocation=uuid.uuid4().hex,
        console_lines=not progress_bar,
        universal=universal,
        peak_flops=local_cpu_peak(cfg),
    )


def _progress(cfg: RootConfig, on: bool):
    import contextlib

    if not on:
        return contextlib.nullcontext()
    from trainer.driver.progress import MetricsProgress

    return MetricsProgress(storage.join(cfg.run_uri, "metrics.jsonl"), cfg.trainer.max_steps)


def local_cpu_peak(cfg: RootConfig) -> float | None:
    """CPU workers of the private local cluster run on this machine: measure its peak here,
    once per machine (cached), instead of in every worker at once. Elsewhere each worker
    resolves its own device's peak (trainer/worker/observability/metrics.py)."""
    t, c = cfg.trainer, cfg.cluster
    if t.peak_flops or c.use_gpu or c.address is not None:
        return t.peak_flops
    from trainer.worker.observability.metrics import peak_flops_per_worker

    return peak_flops_per_worker(cfg.precision.dtype_name, c.threads_per_worker)


def plan_data(cfg: RootConfig) -> Optional[PlannedPrepare]:
    """What preparing the data will do, found before Ray starts (data_pipeline.prepare's
    plan_prepare: out_dir, tokenizer and the sources' listing, from metadata), so that a bad
    source, or prepared data that do not fit the model, is one line before any process starts.
    A single task for the private local cluster is run here too. None for a mixture (its
    datasets are prepared; prepare_data checks them)."""
    if cfg.data.mixture:
        return None
    from data_pipeline.prepare import plan_prepare

    planned = plan_prepare(cfg.data, hint=preflight.TRAIN_OVERWRITE_HINT)
    if cfg.cluster.address is None and planned.runs_here:
        # One task, which prepare runs in this process anyway: run it now, so that what only
        # reading the documents finds (no documents, a bad line) is one line before Ray starts.
        from data_pipeline.prepare import prepare

        manifest = prepare(cfg.data, hint=preflight.TRAIN_OVERWRITE_HINT, planned=planned)
        planned = dataclasses.replace(planned, existing=manifest)
    if planned.existing is not None:
        check_prepared(cfg, planned.existing)
    return planned


def prepare_data(cfg: RootConfig, planned: Optional[PlannedPrepare] = None) -> str:
    """Runs data preparation (idempotent; `planned` from plan_data, or planned here) and
    checks it against the model. A mixture's datasets are prepared already: they are checked
    instead, and the workers get the first source's directory for what needs one dataset
    (tokenizer, sample prompt)."""
    if cfg.data.mixture:
        preflight.check_mixture(cfg)
        return cfg.data.mixture.sources[cfg.data.mixture.names[0]].dir
    from data_pipeline.prepare import prepare

    manifest = prepare(cfg.data, hint=preflight.TRAIN_OVERWRITE_HINT, planned=planned)
    check_prepared(cfg, manifest)
    return cfg.data.out_dir


def check_prepared(cfg: RootConfig, manifest: Manifest) -> None:
    """The prepared dataset fits the model and the eval settings (ConfigError otherwise)."""
    check_vocab_fits(cfg.model, int(manifest.tokenizer.vocab_size), cfg.data.out_dir)
    if manifest.seq_len != cfg.data.seq_len:
        raise ConfigError(
            f"data.seq_len ({cfg.data.seq_len}) differs from the prepared shards' seq_len "
            f"({manifest.seq_len}) in {cfg.data.out_dir}"
        )
    check_eval_fits(cfg, manifest.splits["val"].num_samples, cfg.data.out_dir)


def write_run_config(cfg: RootConfig) -> None:
    import yaml

    storage.write_text(
        storage.join(cfg.run_uri, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    )


def read_summary(cfg: RootConfig, invocation: str) -> dict[str, Any]:
    """This invocation's summary.json from the run directory (an older one is not taken), with
    the run's latest verified checkpoint."""
    from trainer.checkpoint import index

    try:
        summary = json.loads(storage.read_text(storage.join(cfg.run_uri, "summary.json")))
    except (FileNotFoundError, ValueError):
        summary = {}
    if summary.get("invocation") != invocation:
        summary = {}
    summary["checkpoint"] = index.latest(cfg.run_uri, hashes=False).uri
    summary["run_dir"] = cfg.run_uri
    return summary
