"""I/O checks on the driver, before any worker starts: every failure is a ConfigError (one
line naming the value and the rule) and nothing is written or changed.

Before Ray: the fault-drill spec, the storage (run.root, data.out_dir, model.init_from can be
reached and written: bucket, credentials, endpoint, permissions), the data sources, NVMe
offload, the allocator. After Ray is up: the cluster can hold the workers, and a local path
used by a multi-node cluster is visible from every node.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from cluster.config import ClusterError
from data_pipeline import storage
from data_pipeline.manifest import MANIFEST_FILE
from trainer.config import ConfigError, RootConfig


def check_before_ray(cfg: RootConfig) -> None:
    from cluster.launch import preload_for
    from trainer.worker import faults

    try:
        faults.from_env()  # a drill's spec is checked here, not in a worker
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_storage(cfg)
    check_sources(cfg)
    check_offload(cfg)
    try:
        preload_for(cfg.cluster)  # cluster.allocator=tcmalloc where there is none
    except ClusterError as e:
        raise ConfigError(str(e)) from None


def check_storage(cfg: RootConfig) -> None:
    """run.root and data.out_dir can be written (or, for prepared data, read)."""
    try:
        storage.check_credentials(cfg.run.root, "run.root")
        storage.check_credentials(cfg.data.out_dir, "data.out_dir")
        storage.check_writable(cfg.run.root, "run.root")
        out = cfg.data.out_dir
        if storage.exists(storage.join(out, MANIFEST_FILE)):
            storage.check_readable(out, "data.out_dir")  # prepared data may be read-only
        else:
            storage.check_writable(out, "data.out_dir")
    except (storage.StorageError, OSError) as e:
        raise ConfigError(str(e)) from None


def check_sources(cfg: RootConfig) -> None:
    """Cheap checks of data.sources (paths exist, globs match) when the data is not prepared."""
    from data_pipeline.sources import list_work_units

    if not storage.exists(storage.join(cfg.data.out_dir, MANIFEST_FILE)):
        list_work_units(cfg.data)


def check_offload(cfg: RootConfig, *, default_cuda_home: str = "/usr/local/cuda") -> None:
    """NVMe offload needs DeepSpeed's async_io op and a writable nvme_path: say so up front.
    On GPU workers DeepSpeed builds that op with nvcc at the first step, so the CUDA toolkit
    must be found where torch's extension builder looks: CUDA_HOME (or CUDA_PATH), nvcc on
    PATH, or default_cuda_home."""
    import os
    import shutil

    p = cfg.parallel
    if p.offload_device != "nvme":
        return
    if cfg.cluster.use_gpu and not (
        os.environ.get("CUDA_HOME")
        or os.environ.get("CUDA_PATH")
        or shutil.which("nvcc")
        or os.path.exists(os.path.join(default_cuda_home, "bin", "nvcc"))
    ):
        raise ConfigError(
            "parallel.offload_device=nvme on GPU workers needs the CUDA toolkit (DeepSpeed "
            "builds its async_io op with nvcc): set CUDA_HOME or put nvcc on PATH, or use "
            "offload_device=cpu"
        )
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise ConfigError(
            "parallel.offload_device=nvme needs DeepSpeed's async_io op, which needs libaio: "
            "install libaio-dev (apt install libaio-dev) on every node, or use offload_device=cpu"
        )
    try:
        storage.check_writable(p.nvme_path, "parallel.nvme_path")
    except storage.StorageError as e:
        raise ConfigError(str(e)) from None


def check_cluster(cfg: RootConfig) -> None:
    """With Ray up: capacity (joined clusters) and local paths every node must see."""
    from cluster.launch import check_capacity

    if cfg.cluster.address is None:
        return  # a private local Ray: one machine, capacity checked in validate()
    try:
        check_capacity(cfg.cluster)
    except ClusterError as e:
        raise ConfigError(str(e)) from None
    check_shared_paths(cfg)


def _sees(path: str, token: str) -> bool:
    p = Path(path)
    return p.is_file() and p.read_text() == token


def check_shared_paths(cfg: RootConfig) -> None:
    """A local run.root / data.out_dir on a multi-node cluster must be a mount every node sees:
    a probe file written here is looked for by a task on each node, then removed."""
    from cluster.launch import run_on_every_node

    for what, uri in (("run.root", cfg.run.root), ("data.out_dir", cfg.data.out_dir)):
        if storage.is_remote(uri):
            continue
        where = Path(storage.nearest_existing(uri))
        probe = where / f".raygpt-shared-probe-{uuid.uuid4().hex[:12]}"
        token = uuid.uuid4().hex
        probe.write_text(token)
        try:
            seen = run_on_every_node(_sees, str(probe), token)
        finally:
            probe.unlink(missing_ok=True)
        blind = sorted(node for node, ok in seen.items() if not ok)
        if blind:
            raise ConfigError(
                f"{what} ({uri}) is a local path that {len(blind)} of {len(seen)} Ray nodes do not "
                f"see (node {blind[0][:12]}): use storage every node shares (a shared mount, "
                "s3:// or gs://)"
            )
