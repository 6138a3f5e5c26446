"""Cluster group: where the workers run and what each one gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ALLOCATORS = ("auto", "tcmalloc", "glibc")


class ClusterError(ValueError):
    """A cluster that cannot run the job as configured; str() is one line for the user."""


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    name: str = "local"
    # None: start a private local Ray instance. "auto": join the cluster this process runs on
    # (ray job submit / a node of it). "ray://host:10001": Ray client.
    address: Optional[str] = None
    num_workers: int = 2
    cpus_per_worker: float = 1.0
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

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers ({self.num_workers}) must be >= 1")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker ({self.cpus_per_worker}) must be > 0")
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
    def threads_per_worker(self) -> int:
        return self.torch_threads or max(1, int(self.cpus_per_worker))
