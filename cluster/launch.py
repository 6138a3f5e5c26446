"""Ray side: start or join Ray, prepare the data on it, run the TorchTrainer."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig
from trainer.config import ConfigError, RootConfig


@functools.cache
def find_tcmalloc() -> str | None:
    """The tcmalloc library the dynamic linker knows (soname), or None (asked once: it runs
    ldconfig)."""
    import ctypes.util

    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def preload_for(cluster: ClusterConfig) -> str | None:
    """The library to LD_PRELOAD into the workers for cluster.allocator, or None."""
    if cluster.allocator == "glibc":
        return None
    lib = find_tcmalloc()
    if lib is None and cluster.allocator == "tcmalloc":
        raise ConfigError(
            "cluster.allocator=tcmalloc: no tcmalloc library on this machine "
            "(apt install libtcmalloc-minimal4, or cluster.allocator=auto|glibc)"
        )
    return lib


def worker_env(cluster: ClusterConfig) -> dict[str, str]:
    """Environment of every training worker."""
    env = {
        "OMP_NUM_THREADS": str(cluster.threads_per_worker),
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_SILENT": "true",
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    }
    if not cluster.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator; torch.distributed on gloo
    lib = preload_for(cluster)
    if lib:
        env["LD_PRELOAD"] = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), lib]))
    return env


def connect(cluster: ClusterConfig) -> bool:
    """Starts a private local Ray (address None) or joins one. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray Train V2 otherwise re-emits every worker print through its logger (twice on screen).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if cluster.address is None:
        ray.init(
            num_cpus=os.cpu_count(),
            # The dashboard serves the State API that Ray Train's placement-group cleaner polls.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            logging_level="WARNING",
            log_to_driver=True,
            configure_logging=True,
        )
        return True
    ray.init(address=cluster.address, logging_level="WARNING")
    return False


def check_capacity(cluster: ClusterConfig) -> None:
    """More workers than the cluster can hold is a config error, not a hang in placement."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need_cpu = cluster.num_workers * cluster.cpus_per_worker
    need_gpu = cluster.num_workers * cluster.gpus_per_worker
    if need_cpu > cpus or need_gpu > gpus:
        raise ConfigError(
            f"cluster.num_workers ({cluster.num_workers}) needs {need_cpu:g} CPUs and "
            f"{need_gpu:g} GPUs, but the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs"
        )


def check_sources(cfg: RootConfig) -> None:
    """Cheap checks of data.sources (paths exist, globs match) before any Ray process starts."""
    from data_pipeline.manifest import MANIFEST_FILE
    from data_pipeline.sources import list_work_units

    if not (Path(cfg.data.out_dir) / MANIFEST_FILE).is_file():
        list_work_units(cfg.data)


def check_offload(cfg: RootConfig) -> None:
    """NVMe offload needs DeepSpeed's async_io op and a writable nvme_path: say so up front."""
    p = cfg.parallel
    if p.offload_device != "nvme":
        return
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise ConfigError(
            "parallel.offload_device=nvme needs DeepSpeed's async_io op, which needs libaio: "
            "install libaio-dev (apt install libaio-dev) on every node, or use offload_device=cpu"
        )
    try:
        Path(p.nvme_path).mkdir(parents=True, exist_ok=True)
        probe = Path(p.nvme_path) / ".raygpt-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"parallel.nvme_path ({p.nvme_path}) is not writable: {e}") from None


def prepare_data(cfg: RootConfig) -> str:
    """Runs data preparation (idempotent, on Ray Data) and checks it against the model."""
    from data_pipeline.prepare import prepare

    manifest = prepare(cfg.data)
    vocab = int(manifest.tokenizer.vocab_size)
    if cfg.model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocab "
            f"({vocab}) in {cfg.data.out_dir}"
        )
    if manifest.seq_len != cfg.data.seq_len:
        raise ConfigError(
            f"data.seq_len ({cfg.data.seq_len}) differs from the prepared shards' seq_len "
            f"({manifest.seq_len}) in {cfg.data.out_dir}"
        )
    return str(Path(cfg.data.out_dir).resolve())


def write_run_config(cfg: RootConfig) -> None:
    import yaml

    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


@contextlib.contextmanager
def stop_on_sigterm(stop_signal: Any) -> Iterator[None]:
    """While training: SIGTERM (a preemption notice, `ray job stop`) asks the workers to
    checkpoint at the next step boundary and stop; a second SIGTERM ends the driver at once."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(
            "SIGTERM: checkpointing at the next step boundary, then stopping "
            "(a second SIGTERM stops at once)",
            file=sys.stderr,
            flush=True,
        )
        stop_signal.request.remote("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_training(cfg: RootConfig, *, progress_bar: bool = False) -> dict[str, Any]:
    """Trains on Ray; returns the run's summary. The caller has validated `cfg`.

    progress_bar: draw a live bar on this (driver) terminal; otherwise rank 0 prints lines.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer import faults, universal
    from trainer.checkpoint import read_trainer_state
    from trainer.control import make_stop_signal
    from trainer.loop import train_worker
    from trainer.metrics import peak_flops_per_worker
    from trainer.resume import check_resume_compatible, repair_snapshot, set_aside_unregistered

    try:
        faults.from_env()  # a drill's spec is checked here, not in a worker
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_sources(cfg)
    check_offload(cfg)
    preload_for(cfg.cluster)  # cluster.allocator=tcmalloc where there is none: say so now
    resume_from = check_resume_compatible(cfg)
    saved_cfg = read_trainer_state(resume_from).get("config") if resume_from else None
    convert = bool(resume_from and saved_cfg and universal.plan(cfg, resume_from, saved_cfg))
    started = connect(cfg.cluster)
    try:
        if cfg.cluster.address is not None:
            check_capacity(cfg.cluster)
        data_dir = prepare_data(cfg)
        # Validated, data included: from here on the run directory may change.
        if "://" not in cfg.run.root:
            repair_snapshot(cfg.run_dir)
            set_aside_unregistered(cfg.run_dir)
        uni = universal.prepare(cfg, resume_from, saved_cfg) if convert else None
        peak = cfg.trainer.peak_flops
        if peak is None and not cfg.cluster.use_gpu:
            peak = peak_flops_per_worker(cfg.precision.dtype_name, cfg.cluster.threads_per_worker)
        write_run_config(cfg)
        c = cfg.cluster
        stop_signal = make_stop_signal()
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={
                "cfg": cfg,
                "data_dir": data_dir,
                "peak_flops": peak,
                "console_lines": not progress_bar,
                "universal": uni,
                "stop_signal": stop_signal,
            },
            scaling_config=ScalingConfig(
                num_workers=c.num_workers,
                use_gpu=c.use_gpu,
                resources_per_worker={"CPU": c.cpus_per_worker, "GPU": c.gpus_per_worker}
                if c.use_gpu
                else {"CPU": c.cpus_per_worker},
            ),
            torch_config=TorchConfig(
                backend="nccl" if c.use_gpu else "gloo", timeout_s=c.collective_timeout_s
            ),
            run_config=RunConfig(
                name=cfg.run.name,
                storage_path=str(Path(cfg.run.root).resolve()),
                failure_config=FailureConfig(max_failures=c.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.keep_last),
                worker_runtime_env={"env_vars": worker_env(c)},
                # Our own lines say when a checkpoint is saved; Ray's INFO chatter repeats it.
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        bar = contextlib.nullcontext()
        if progress_bar:
            from trainer.progress import MetricsProgress

            bar = MetricsProgress(cfg.run_dir / "metrics.jsonl", cfg.trainer.max_steps)
        with bar, stop_on_sigterm(stop_signal):
            result = trainer.fit()
        summary_file = cfg.run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        ckpt = result.checkpoint.path if result.checkpoint is not None else None
        summary["checkpoint"] = ckpt
        summary["run_dir"] = str(cfg.run_dir.resolve())
        return summary
    finally:
        if started:
            ray.shutdown()
