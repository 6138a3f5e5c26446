"""Shared fixtures. Tests run from the repo root; every run and dataset goes to tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAYGPT_CACHE", str(ROOT / ".pytest_raygpt_cache"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The smallest config that exercises the whole stack: a 2-layer model on a slice of the
# built-in corpus. Tests add run.root / data.out_dir pointing at tmp dirs.
SMOKE = ["+experiment=smoke", "logging.mode=offline"]


@pytest.fixture(scope="session")
def smoke_overrides() -> list[str]:
    return list(SMOKE)


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> str:
    """The smoke dataset, prepared once per session (tokenizer + Parquet shards): one prepare
    task, which runs in this process (or on the module's Ray when one is up)."""
    from data_pipeline.prepare import prepare
    from trainer.config import load_config

    out = tmp_path_factory.mktemp("data") / "smoke"
    prepare(load_config([*SMOKE, f"data.out_dir={out}"]).data)
    return str(out)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for a module's in-process runs (run_training joins it instead of starting
    and stopping its own each time). Command-line runs in subprocesses start their own."""
    import ray

    from cluster.config import ClusterConfig
    from cluster.launch import connect

    started = connect(ClusterConfig())
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (moto) for this session, with a bucket and the AWS
    environment pointing at it: .endpoint, .bucket, .uri(prefix), .unique_uri(name), .keys().
    Started on first use, once per session (each pytest-xdist worker has its own, on its own
    port), and stopped by its PID at the end. See tests/s3server.py."""
    from s3server import s3_server

    with s3_server() as server:
        yield server
