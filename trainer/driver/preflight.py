"""I/O checks on the driver, before any worker starts: every failure is a ConfigError (one
line naming the value and the rule) and nothing is written or changed.

Right after the config is loaded (check_inputs): the tokenizer's vocab, model.init_from, the
environment and this machine's CPUs/GPUs. Before Ray: the fault-drill spec, the storage
(run.root, data.out_dir, model.init_from can be reached and written: bucket, credentials,
endpoint, permissions), the data sources, NVMe offload, the allocator. After Ray is up: the cluster can hold the workers, and a local path
used by a multi-node cluster is visible from every node.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Optional

from cluster.config import ClusterError
from data_pipeline import storage
from data_pipeline.config import DataConfig
from data_pipeline.manifest import MANIFEST_FILE
from trainer.config import ConfigError, RootConfig, check_eval_fits, check_vocab_fits
from trainer.precision import NATIVE_BF16_FLAGS, cpu_flags


def check_inputs(cfg: RootConfig) -> None:
    """The checks of a valid config that read files, the environment or this machine (the
    rules themselves are trainer/config.py's): model.init_from's config.json fits the model,
    the tokenizer's vocab fits model.vocab_size, logging.mode=online has WANDB_API_KEY, a
    private local cluster fits this machine, and GPU workers' GPUs have a known peak. Every command that validates a config runs it
    right after load_config (train, --check, each job of a sweep), so before Ray starts."""
    m, d, c = cfg.model, cfg.data, cfg.cluster
    if m.init_from:
        from trainer.init_from import check_hf_config

        try:
            check_hf_config(m, m.init_from)
        except (ValueError, OSError) as e:
            raise ConfigError(f"model.init_from: {e}") from None
    # A mixture's datasets are prepared: check_mixture checks their vocab, before Ray.
    if not d.mixture:
        check_vocab_fits(m, *tokenizer_vocab_size(d))
    if cfg.logging.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("logging.mode=online needs WANDB_API_KEY in the environment")
    if c.address is None:
        cpus = os.cpu_count() or 1
        need = c.num_workers * c.cpus_per_worker
        if need > cpus:
            raise ConfigError(
                f"cluster.num_workers ({c.num_workers}) x cpus_per_worker ({c.cpus_per_worker}) "
                f"= {need:g} CPUs, but this machine has {cpus}: the local cluster cannot hold them"
            )
        if c.use_gpu:
            import torch

            gpus = torch.cuda.device_count()
            if c.num_workers * c.gpus_per_worker > gpus:
                raise ConfigError(
                    f"cluster.num_workers ({c.num_workers}) x gpus_per_worker "
                    f"({c.gpus_per_worker}) GPUs requested, but this machine has {gpus}"
                )
    if c.use_gpu and not cfg.trainer.peak_flops:
        check_gpu_peak(cfg.precision.dtype_name)


def check_gpu_peak(dtype: str) -> None:
    """Every GPU this machine has needs a datasheet peak (MFU) unless trainer.peak_flops is
    set: asked here, once, before Ray, instead of by every worker (each attempt of
    cluster.max_failures would stop on it). A driver without GPUs (a remote cluster's head
    node) leaves the question to the workers."""
    import torch

    if not torch.cuda.is_available():
        return
    from trainer.worker.observability.metrics import UnknownGPUError, gpu_peak_flops

    for index in range(torch.cuda.device_count()):
        try:
            gpu_peak_flops(dtype, index)
        except UnknownGPUError as e:
            raise ConfigError(str(e)) from None


def tokenizer_vocab_size(data: DataConfig) -> tuple[int, str]:
    """The vocab size the data will have, and where that number comes from: the prepared
    manifest, else a given tokenizer's own size (data.vocab_size is unused then), else the
    BPE size data.vocab_size. An object-store tokenizer is read by prepare, after preflight
    (0 here; trainer/driver/run.py checks the prepared manifest)."""
    remote_tok = bool(data.tokenizer) and storage.is_remote(data.tokenizer)
    if data.tokenizer and not remote_tok and not Path(data.tokenizer).exists():
        raise ConfigError(f"data.tokenizer: file '{data.tokenizer}' does not exist")
    if data.tokenizer and not remote_tok:  # another kind of tokenizer file: say which is wanted
        from data_pipeline.tokenizer import EXPECTED, wrong_kind

        if Path(data.tokenizer).is_dir():
            raise ConfigError(f"data.tokenizer: {data.tokenizer!r} is a directory; {EXPECTED}")
        kind = wrong_kind(data.tokenizer, Path(data.tokenizer).read_bytes())
        if kind:
            raise ConfigError(kind)
    if not storage.is_remote(data.out_dir):  # object stores: read after preflight, by prepare
        from data_pipeline.manifest import manifest_uri, read_manifest

        try:
            manifest = read_manifest(data.out_dir)
        except (OSError, ValueError):
            manifest = None  # prepare will rebuild or complain; use the configured size
        if manifest is not None:
            return int(manifest.tokenizer.vocab_size), manifest_uri(data.out_dir)
    if remote_tok:
        return 0, f"{data.tokenizer}, read by prepare"
    if data.tokenizer:
        try:
            from tokenizers import Tokenizer

            return Tokenizer.from_file(data.tokenizer).get_vocab_size(), data.tokenizer
        except Exception as e:  # noqa: BLE001 - any parse failure is a user error here
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"data.tokenizer: {data.tokenizer!r} is not a valid tokenizer.json ({reason})"
            ) from None
    return data.vocab_size, "data.vocab_size"


def check_before_ray(cfg: RootConfig) -> None:
    from cluster.launch import preload_for
    from trainer.worker import faults

    try:
        faults.from_env()  # a drill's spec is checked here, not in a worker
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.mixture:  # prepared datasets: data.sources and data.out_dir are not used
        check_mixture(cfg)
    else:
        check_storage(cfg)
        check_sources(cfg)
    check_offload(cfg)
    warn_slow_cpu_bf16(cfg)
    try:
        preload_for(cfg.cluster)  # cluster.allocator=tcmalloc where there is none
    except ClusterError as e:
        raise ConfigError(str(e)) from None


def warn_slow_cpu_bf16(cfg: RootConfig, flags: Optional[set[str]] = None) -> None:
    """One warning line for bf16 on CPU workers of this machine (the local cluster) when its
    CPU has no native bf16: there, a bf16 matmul runs at a few % of fp32's rate (0.3 vs 15
    GFLOP/s per thread on an AVX2 EPYC, bench/README.md), so precision=fp32 trains faster.
    Workers on other machines (a joined cluster) may have other CPUs: nothing is said."""
    if cfg.cluster.use_gpu or cfg.cluster.address is not None or not cfg.precision.bf16:
        return
    flags = cpu_flags() if flags is None else flags
    if flags is None or any(f in flags for f in NATIVE_BF16_FLAGS):
        return
    print(
        "warning: precision=bf16 on this CPU, which has no native bf16 (no "
        f"{' / '.join(NATIVE_BF16_FLAGS)}): its bf16 matmuls are emulated, many times slower "
        "than fp32; precision=fp32 trains faster here",
        file=sys.stderr,
    )


# prepare's remedy for an out_dir holding something else, as this command can follow it
# (`python -m trainer.train` has no --overwrite flag).
TRAIN_OVERWRITE_HINT = (
    "replace it with `python -m data_pipeline.prepare --overwrite` and the same data.* settings"
)


def check_storage(cfg: RootConfig) -> None:
    """run.root and data.out_dir can be written (or, for prepared data, read), and data.out_dir
    holds this run's dataset, nothing or an empty directory (what prepare would accept). With
    the data prepared: the validation split holds an eval."""
    from data_pipeline.config import DataError
    from data_pipeline.prepare import check_out_dir

    try:
        storage.check_credentials(cfg.run.root, "run.root")
        storage.check_credentials(cfg.data.out_dir, "data.out_dir")
        storage.check_writable(cfg.run.root, "run.root")
        out = cfg.data.out_dir
        if storage.exists(storage.join(out, MANIFEST_FILE)):
            storage.check_readable(out, "data.out_dir")  # prepared data may be read-only
        manifest = check_out_dir(cfg.data, hint=TRAIN_OVERWRITE_HINT)
    except (storage.StorageError, OSError, DataError) as e:
        raise ConfigError(str(e)) from None
    if manifest is not None:
        check_eval_fits(cfg, manifest.splits["val"].num_samples, out)


def check_mixture(cfg: RootConfig) -> dict:
    """data.mixture: run.root writable; every source a readable prepared dataset, all of one
    tokenizer and seq_len (= data.seq_len); the vocab within model.vocab_size; each source's
    validation split holds an eval. Returns name -> Manifest."""
    from data_pipeline.config import DataError
    from data_pipeline.mixture import check_datasets

    mixture = cfg.data.mixture
    try:
        storage.check_credentials(cfg.run.root, "run.root")
        storage.check_writable(cfg.run.root, "run.root")
        for name in mixture.names:
            storage.check_credentials(mixture.sources[name].dir, f"data.mixture.sources.{name}.dir")
        manifests = check_datasets(mixture, cfg.data.seq_len)
    except (storage.StorageError, OSError, DataError) as e:
        raise ConfigError(str(e)) from None
    first = mixture.names[0]
    vocab = manifests[first].tokenizer.vocab_size
    check_vocab_fits(cfg.model, vocab, f"the mixture's source {first!r}")
    for name, manifest in manifests.items():
        where = f"data.mixture.sources.{name} ({mixture.sources[name].dir})"
        check_eval_fits(cfg, manifest.splits["val"].num_samples, where)
    return manifests


def check_sources(cfg: RootConfig) -> None:
    """Cheap checks of data.sources when the data is not prepared: paths exist, globs match,
    local Parquet files have a readable footer with the text column (a damaged file or a
    missing column is named here, not by a prepare task after Ray started)."""
    from data_pipeline.sources import check_parquet_files, list_work_units

    if not storage.exists(storage.join(cfg.data.out_dir, MANIFEST_FILE)):
        check_parquet_files(list_work_units(cfg.data), cfg.data)


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
    try:  # first: the cheap check, and the one only the user's setting can fix
        storage.check_writable(p.nvme_path, "parallel.nvme_path")
    except storage.StorageError as e:
        raise ConfigError(str(e)) from None
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


def check_cluster(cfg: RootConfig) -> None:
    """With Ray up: capacity (joined clusters) and local paths every node must see."""
    from cluster.launch import check_capacity

    if cfg.cluster.address is None:
        return  # a private local Ray: one machine, capacity checked in check_inputs()
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

    mixture = cfg.data.mixture
    data = [(f"data.mixture.sources.{n}.dir", mixture.sources[n].dir) for n in mixture.names]
    for what, uri in [("run.root", cfg.run.root), *(data or [("data.out_dir", cfg.data.out_dir)])]:
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
