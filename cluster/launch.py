"""Ray only (imports nothing from trainer/): connect, capacity, the workers' environment,
the stop signal, and fit_on_ray (cluster/fit.py's fit on Ray Train).

Failures a user can fix (too few resources, no tcmalloc) raise ClusterError with one line.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Optional

from cluster import ray_private
from cluster.config import ClusterConfig, ClusterError

if TYPE_CHECKING:
    from cluster.fit import FitOptions


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
        raise ClusterError(
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
    # The accelerator comes from the cluster config, never from what the host happens to have:
    # CPU workers on a GPU host stay on DeepSpeed's CPU accelerator (gloo).
    env["DS_ACCELERATOR"] = "cuda" if cluster.use_gpu else "cpu"
    lib = preload_for(cluster)
    if lib:
        env["LD_PRELOAD"] = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), lib]))
    return env


def connect(cluster: ClusterConfig, job_env: Optional[dict[str, str]] = None) -> bool:
    """Starts a private local Ray (address None) or joins one. True if we started it.

    job_env: environment for every process of this job on a joined cluster (Ray Train's
    controller and workers, Ray tasks), e.g. object-store settings; a private local Ray's
    processes inherit this process's environment instead. Variables the job already has
    (`ray job submit --runtime-env-json`) stay as they are."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stdout.isatty():  # logs written to a file or a pipe: no colour escape codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # Ray Train V2 otherwise re-emits every worker print through its logger (twice on screen).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if cluster.address is None:
        ray_private.settle_token_auth()  # Ray's choice, without a warning on every run
        for key, value in ray_private.LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(key, value)  # an explicit setting of the user's wins
        ray.init(
            num_cpus=os.cpu_count(),
            # The dashboard serves the State API that Ray Train's placement-group cleaner polls.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            logging_level="WARNING",
            log_to_driver=True,
            configure_logging=True,
        )
        ray_private.drop_noise_from_worker_logs()
        return True
    given = ray_private.job_env_vars()
    env = {k: v for k, v in (job_env or {}).items() if k not in given}
    ray.init(
        address=cluster.address,
        logging_level="WARNING",
        runtime_env={"env_vars": env} if env else None,
    )
    ray_private.drop_noise_from_worker_logs()
    return False


@contextlib.contextmanager
def connected(cluster: ClusterConfig, job_env: Optional[dict[str, str]] = None) -> Iterator[None]:
    """Ray is up for the block; a private instance started here is shut down after it. An
    in-process run (cluster.launch) needs no Ray: nothing is started."""
    import ray

    if cluster.in_process:
        yield
        return
    started = connect(cluster, job_env)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def check_capacity(cluster: ClusterConfig) -> None:
    """A worker group the cluster can never hold is refused in one line (not a hang in
    placement). An autoscaling cluster is judged by what it can scale up to, so GPUs that it
    can still add are not refused; Ray Train then waits for the nodes. Without an autoscaler,
    one worker must also fit on one node (a placement group bundle never spans nodes)."""
    now = ray_private.current_resources()
    limits = ray_private.max_resources()  # None: no autoscaler can add nodes
    need = {
        "CPU": cluster.num_workers * cluster.cpus_per_worker,
        "GPU": cluster.num_workers * cluster.gpus_per_worker,
    }
    most = {k: max(now.get(k, 0.0), (limits or {}).get(k, 0.0)) for k in need}
    if any(need[k] > most[k] for k in need):
        grow = (
            f", and its autoscaler can grow it to {most['CPU']:g} CPUs and {most['GPU']:g} GPUs"
            if limits is not None
            else ""
        )
        raise ClusterError(
            f"cluster.num_workers ({cluster.num_workers}) needs {need['CPU']:g} CPUs and "
            f"{need['GPU']:g} GPUs, but the Ray cluster has {now.get('CPU', 0.0):g} CPUs and "
            f"{now.get('GPU', 0.0):g} GPUs{grow}"
        )
    if any(need[k] > now.get(k, 0.0) for k in need):
        print(
            f"cluster: {need['GPU']:g} GPUs / {need['CPU']:g} CPUs requested, "
            f"{now.get('GPU', 0.0):g} / {now.get('CPU', 0.0):g} up now: waiting for the "
            "autoscaler to add nodes",
            flush=True,
        )
        return
    if limits is None:
        one = {"CPU": cluster.cpus_per_worker, "GPU": cluster.gpus_per_worker}
        nodes = ray_private.node_resources()
        if nodes and not any(all(n.get(k, 0.0) >= v for k, v in one.items()) for n in nodes):
            biggest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
            raise ClusterError(
                f"one worker needs {one['CPU']:g} CPUs and {one['GPU']:g} GPUs on one node "
                f"(cluster.cpus_per_worker, cluster.gpus_per_worker), but the largest Ray node "
                f"has {biggest.get('CPU', 0.0):g} CPUs and {biggest.get('GPU', 0.0):g} GPUs"
            )


def run_on_every_node(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """fn(*args) once on each alive node (pinned by node id): node id -> result."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0)(fn)
    refs = {
        n["NodeID"]: remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(*args)
        for n in ray.nodes()
        if n.get("Alive")
    }
    return dict(zip(refs, ray.get(list(refs.values()), timeout=120)))


def run_as_worker(fn: Callable[..., Any], cluster: ClusterConfig, *args: Any) -> Any:
    """fn(*args) as one Ray task with one worker's resources (cluster.cpus_per_worker and
    gpus_per_worker), so it runs on hardware a training worker would get."""
    import ray

    remote = ray.remote(num_cpus=cluster.cpus_per_worker, num_gpus=cluster.gpus_per_worker)(fn)
    return ray.get(remote.remote(*args), timeout=300)


def make_stop_signal() -> Any:
    """A driver-owned actor holding the stop request; workers poll it
    (trainer/worker/control.py)."""
    import ray

    from cluster.worker_context import StopFlag

    return ray.remote(num_cpus=0)(StopFlag).remote()


@contextlib.contextmanager
def stop_on_sigterm(request: Callable[[str], Any]) -> Iterator[None]:
    """While training: SIGTERM (a preemption notice, `ray job stop`) asks the workers to
    checkpoint at the next step boundary and stop, through request("SIGTERM"); a second
    SIGTERM ends the driver at once."""
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
        request("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


RAY_TRAIN_DIR = "ray_train"  # Ray Train's own files, under the run's storage


# Below this, `ray job stop` kills the job before it can reach its next stop decision, save a
# checkpoint and upload it (cluster/submit.py sets STOP_GRACE_S, 120 s).
MIN_STOP_GRACE_S = 30


def stop_grace_warning() -> Optional[str]:
    """One warning line when this process is the driver of a submitted Ray job whose stop grace
    (RAY_JOB_STOP_WAIT_TIME_S, Ray's default 3 s) is under MIN_STOP_GRACE_S, naming the remedy;
    None otherwise (not a job, or a long enough grace)."""
    from cluster.submit import STOP_GRACE_S

    grace = ray_private.job_stop_grace_s()
    if grace is None or grace >= MIN_STOP_GRACE_S:
        return None
    var = ray_private.JOB_STOP_WAIT_VAR
    setting = f"{var}={grace:g}" if os.environ.get(var) else f"no {var}, Ray's default"
    return (
        f"warning: this Ray job is killed {grace:g} s after `ray job stop` ({setting}), too "
        "soon to save a stop checkpoint: the stop falls back to the previous checkpoint; submit "
        f'with --runtime-env-json \'{{"env_vars": {{"{var}": "{STOP_GRACE_S}"}}}}\' or '
        "with `python -m cluster.submit`"
    )


def fit_on_ray(fn: Callable[[Any, Any], None], payload: Any, options: FitOptions) -> None:
    """fn(payload, context) on cluster.num_workers Ray Train workers (cluster/fit.py's fit).

    Ray Train's own bookkeeping (its run state, the check that every node reaches the storage)
    lives in <storage_path>/ray_train/: the workers report no checkpoints to Ray, so Ray keeps
    and restores none. A SIGTERM to this driver asks the workers to stop.
    """
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    c = options.cluster
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    stop_signal = make_stop_signal()
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"fn": fn, "payload": payload, "stop_signal": stop_signal},
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(
            backend="nccl" if c.use_gpu else "gloo", timeout_s=c.collective_timeout_s
        ),
        run_config=RunConfig(
            name=RAY_TRAIN_DIR,
            storage_path=options.storage_path,
            failure_config=FailureConfig(max_failures=c.max_failures),
            worker_runtime_env={"env_vars": worker_env(c)},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    with stop_on_sigterm(lambda reason: stop_signal.request.remote(reason)):
        trainer.fit()


def _ray_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: the caller's fn with this worker's context."""
    from cluster.worker_context import RayContext

    config["fn"](config["payload"], RayContext(config["stop_signal"]))
