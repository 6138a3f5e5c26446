"""Cluster group: where the workers run and what each one gets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

ALLOCATORS = ("auto", "tcmalloc", "glibc")
LAUNCHES = ("auto", "ray", "process")


class ClusterError(ValueError):
    """A cluster that cannot run the job as configured; str() is one line for the user."""


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    name: str = "local"
    # None: start a private local Ray instance. "auto": join the cluster this process runs on
    # (ray job submit / a node of it). "ray://host:10001": Ray client.
    address: Optional[str] = None
    num_workers: int = 2
    # CPUs (Ray resources) per worker. 0: share this machine's cores among the workers of a
    # private local cluster (cores // num_workers each); on a joined cluster 0 means 1.
    cpus_per_worker: float = 0.0
    gpus_per_worker: float = 0.0
    # torch intra-op threads per worker; 0 -> max(1, int(cpus_per_worker)).
    torch_threads: int = 0
    # Ray Train restarts the whole worker group this many times (-1 = forever).
    max_failures: int = 0
    # torch.distributed collective timeout: a hung all-reduce becomes a failure after this.
    collective_timeout_s: int = 1800
    # The workers' malloc. "tcmalloc": LD_PRELOAD tcmalloc (apt install libtcmalloc-minimal4).
    # Ray Train runs the step in a thread, and glibc's per-thread arenas unmap and re-fault the
    # step's large activation and gradient blocks (d_model 2048 on CPU: 6.7-7.7 s a step against
    # 5.4 s with tcmalloc). "glibc": leave it alone. "auto": tcmalloc where it is installed.
    allocator: str = "auto"
    # How the workers start. "ray": Ray Train workers. "process": the one worker of a private
    # local cluster runs in this process, without starting Ray (seconds instead of tens of
    # seconds; checkpoints, resume, SIGTERM and max_failures behave the same). "auto": "process"
    # for one worker on a private local cluster, else "ray".
    launch: str = "auto"

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers ({self.num_workers}) must be >= 1")
        if self.cpus_per_worker < 0:
            raise ValueError(f"cpus_per_worker ({self.cpus_per_worker}) must be > 0, or 0 (auto)")
        if self.cpus_per_worker == 0:  # resolved once, here: every reader sees the number
            share = (os.cpu_count() or 1) // self.num_workers if self.address is None else 1
            object.__setattr__(self, "cpus_per_worker", float(max(1, share)))
        if self.launch not in LAUNCHES:
            choices = ", ".join(repr(a) for a in LAUNCHES)
            raise ValueError(f"launch ({self.launch!r}) must be one of {choices}")
        if self.launch == "process" and (self.address is not None or self.num_workers != 1):
            raise ValueError(
                f"launch 'process' runs the one worker of a private local cluster in this "
                f"process: it needs address null and num_workers 1 (got address "
                f"{self.address!r}, num_workers {self.num_workers}); use launch=auto or ray"
            )
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker ({self.gpus_per_worker}) must be >= 0")
        if self.gpus_per_worker > 0 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(
                f"gpus_per_worker ({self.gpus_per_worker}) must be a whole number: NCCL needs "
                "one process per GPU (use 0 for CPU workers)"
            )
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads ({self.torch_threads}) must be >= 0")
        if self.max_failures < -1:
            raise ValueError(f"max_failures ({self.max_failures}) must be >= -1")
        if self.allocator not in ALLOCATORS:
            choices = ", ".join(repr(a) for a in ALLOCATORS)
            raise ValueError(f"allocator ({self.allocator!r}) must be one of {choices}")
        if self.collective_timeout_s < 1:
            raise ValueError(f"collective_timeout_s ({self.collective_timeout_s}) must be >= 1")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def in_process(self) -> bool:
        """The worker runs in the driver's process, without Ray (see `launch`)."""
        if self.launch == "auto":
            return self.address is None and self.num_workers == 1
        return self.launch == "process"

    @property
    def threads_per_worker(self) -> int:
        return self.torch_threads or max(1, int(self.cpus_per_worker))
