"""cluster.launch=process: the one worker of a private local cluster runs in this process.

A one-worker run on this machine needs nothing Ray does: no scheduling, no placement, no
second process. Starting Ray (GCS, raylet, dashboard), Ray Train's controller and a worker
actor that imports torch and DeepSpeed again took ~30 s of a 2-step run on 2 cores; here the
worker starts as soon as the driver has checked the config. Everything a Ray Train worker gets
is given here too (cluster/worker_context.py's ProcessContext): rank 0 of 1 with a gloo/NCCL
process group, SIGTERM -> a stop request, and cluster.max_failures restarts (the worker
resumes from its own latest checkpoint, as on Ray). The workers' environment is
cluster.launch.worker_env's; an allocator that must be preloaded (LD_PRELOAD tcmalloc) cannot
be loaded into a running process, so `reexec_for_allocator` restarts the command with it
first.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any, Optional

from cluster.config import ClusterConfig
from cluster.launch import stop_on_sigterm, worker_env
from cluster.worker_context import ProcessContext, StopFlag


def preload_missing(cluster: ClusterConfig, env: Optional[dict[str, str]] = None) -> Optional[str]:
    """The LD_PRELOAD this process would need for cluster.allocator and lacks, or None."""
    want = worker_env(cluster).get("LD_PRELOAD")
    have = (os.environ if env is None else env).get("LD_PRELOAD", "")
    if not want or all(lib in have.split() for lib in want.split()):
        return None
    return want


def reexec_for_allocator(cluster: ClusterConfig) -> None:
    """Restarts this command with the allocator preloaded when it is not (once: the new
    process has it). Returns only when nothing needs to change."""
    want = preload_missing(cluster)
    if want is None:
        return
    print(f"restarting with LD_PRELOAD={want} (cluster.allocator={cluster.allocator})", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "LD_PRELOAD": want})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _worker_environment(cluster: ClusterConfig) -> Iterator[None]:
    """The worker's environment variables (worker_env, a world of one) for the block."""
    env = {k: v for k, v in worker_env(cluster).items() if k != "LD_PRELOAD"}
    env.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fit_here(fn: Callable[[Any, Any], None], payload: Any, cluster: ClusterConfig) -> None:
    """Runs fn(payload, context) here as rank 0 of 1 (cluster/fit.py). SIGTERM sets the
    context's stop request. A failure runs fn again (it resumes from its own latest
    checkpoint) up to cluster.max_failures times (-1: forever), then raises the failure.

    The process group of one (gloo or NCCL) outlives the run: DeepSpeed keeps its groups in
    module state, so a second run in this process (a restart, or tests) reuses it; destroyed,
    DeepSpeed would refuse it ("Group ... is not registered")."""
    flag = StopFlag()
    context = ProcessContext(flag)
    failures = 0
    with _worker_environment(cluster), stop_on_sigterm(flag.request):
        while True:
            try:
                fn(payload, context)
                return
            except Exception as e:
                failures += 1
                if cluster.max_failures != -1 and failures > cluster.max_failures:
                    raise
                print(
                    f"worker failed ({type(e).__name__}: {e}); restarting from the latest "
                    f"checkpoint (failure {failures} of cluster.max_failures="
                    f"{cluster.max_failures})",
                    file=sys.stderr,
                    flush=True,
                )
