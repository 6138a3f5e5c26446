"""The GPU paths without a GPU: a CPU run on a GPU host (torch.cuda.is_available() -> True)
makes the same choices as on a CPU host, because the device comes from the cluster config and
DeepSpeed's accelerator; the datasheet peak table matches GPU names exactly; batches go to the
engine's device; weights drawn on the CPU reach parameters elsewhere; the config and preflight
refuse what cannot run on GPUs, in one line."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster.config import ClusterConfig
from cluster.launch import worker_env
from models.gpt import GPTConfig
from trainer.checkpoint import format as checkpoint
from trainer.config import ConfigError, OptimConfig, ParallelConfig, PrecisionConfig, load_config
from trainer.layout import make_layout
from trainer.worker import engine as engine_mod
from trainer.worker.engine import (
    accelerator_device_type,
    comm_backend,
    deepspeed_config,
    eval_losses,
    init_weights,
    to_device,
    train_step,
)
from trainer.worker.observability import metrics
from trainer.worker.observability.metrics import StepTimes, UnknownGPUError, peak_flops_per_worker


def _refuse(what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"called {what}")

    return refuse


@pytest.fixture
def gpu_host(monkeypatch):
    """This process thinks it runs on a host with 8 GPUs; any CUDA call fails the test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    for name in ("get_rng_state", "set_rng_state", "get_device_name", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, _refuse(f"torch.cuda.{name} in a CPU run"))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # as worker_env sets it for CPU workers


def _gpu_named(monkeypatch, name: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


# --------------------------------------------------------------- a CPU run on a GPU host


def test_cpu_workers_on_a_gpu_host_keep_the_cpu_accelerator_and_gloo(
    gpu_host, monkeypatch, tmp_path
):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # the user's choice: kept
    env = worker_env(ClusterConfig(gpus_per_worker=0.0, allocator="glibc"))
    assert env["DS_ACCELERATOR"] == "cpu"
    assert (
        worker_env(ClusterConfig(gpus_per_worker=1.0, allocator="glibc"))["DS_ACCELERATOR"]
        == "cuda"
    )

    import deepspeed

    asked = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: asked.update(kw))
    engine_mod._init_distributed()
    assert asked["dist_backend"] == "gloo" == comm_backend()
    assert accelerator_device_type() == "cpu"
    # Offloaded state is pinned only for copies to a GPU.
    cfg = deepspeed_config(
        GPTConfig(),
        ParallelConfig(zero_stage=3, offload_optimizer=True, offload_params=True),
        PrecisionConfig(name="bf16", bf16=True),
        OptimConfig(),
        layout=make_layout(1, 1, 1),
        micro_batch=1,
        grad_accum=1,
        device_type=accelerator_device_type(),
    )
    assert cfg["zero_optimization"]["offload_optimizer"]["pin_memory"] is False


def test_the_backend_and_device_follow_deepspeeds_accelerator(monkeypatch):
    """A CUDA accelerator (DS_ACCELERATOR=cuda) gives NCCL and CUDA choices, with no look at
    torch.cuda.is_available() (False on this machine)."""
    import deepspeed
    import deepspeed.accelerator

    class CudaLike:
        def communication_backend_name(self):
            return "nccl"

        def device_name(self, device_index=None):
            return "cuda"

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: CudaLike())
    asked = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: asked.update(kw))
    engine_mod._init_distributed()
    assert asked["dist_backend"] == "nccl" and accelerator_device_type() == "cuda"
    cfg = deepspeed_config(
        GPTConfig(),
        ParallelConfig(zero_stage=3, offload_optimizer=True),
        PrecisionConfig(name="bf16", bf16=True),
        OptimConfig(),
        layout=make_layout(1, 1, 1),
        micro_batch=1,
        grad_accum=1,
        device_type=accelerator_device_type(),
    )
    assert cfg["zero_optimization"]["offload_optimizer"]["pin_memory"] is True


def test_cpu_timing_and_memory_figures_on_a_gpu_host(gpu_host):
    assert StepTimes().cuda is False  # CUDA events only when the engine's device is CUDA
    times = StepTimes()
    times.step()
    with times.phase("forward"):
        pass
    assert set(times.lap()) == {"forward_time_s"}
    stats = metrics.memory_stats(device=torch.device("cpu"))
    assert not any(k.startswith("cuda") for k in stats)


def test_rng_state_of_a_cpu_run_on_a_gpu_host_holds_no_cuda_state(gpu_host):
    state = checkpoint.rng_state()
    assert "cuda" not in state
    # A checkpoint written by a GPU run restores its CPU states on a CPU run.
    checkpoint.set_rng_state({**state, "cuda": torch.zeros(16, dtype=torch.uint8)})
    a = torch.rand(3)
    checkpoint.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))


# -------------------------------------------------------------------------- peak FLOP/s


def test_cpu_device_measures_the_cpu_and_a_gpu_device_reads_the_datasheet(gpu_host, monkeypatch):
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda dtype, threads: 7e11)
    assert peak_flops_per_worker("bf16", 2, device=torch.device("cpu")) == 7e11
    assert peak_flops_per_worker("bf16", 2) == 7e11
    _gpu_named(monkeypatch, "NVIDIA L40")
    assert peak_flops_per_worker("bf16", 2, device=torch.device("cuda", 0)) == 181e12


def test_datasheet_peaks_match_gpu_names_exactly(monkeypatch):
    monkeypatch.setattr(
        metrics, "measure_matmul_flops", _refuse("the CPU matmul measurement for a GPU")
    )
    cases = {
        ("NVIDIA H100 80GB HBM3", "bf16"): 989e12,  # SXM5
        ("NVIDIA H100 PCIe", "bf16"): 756e12,
        ("NVIDIA H100 NVL", "bf16"): 835e12,
        ("NVIDIA H200", "bf16"): 989e12,
        ("NVIDIA A100-SXM4-40GB", "bf16"): 312e12,
        ("NVIDIA A100-SXM4-80GB", "fp16"): 312e12,
        ("NVIDIA A100-PCIE-40GB", "bf16"): 312e12,
        ("NVIDIA A100-SXM4-80GB", "fp32"): 19.5e12,
        ("NVIDIA L40S", "bf16"): 362e12,
        ("NVIDIA L40", "bf16"): 181e12,  # not the L4 inside its name
        ("NVIDIA L4", "bf16"): 121e12,
        ("NVIDIA A10G", "bf16"): 125e12,
        ("NVIDIA H100 PCIe", "fp32"): 51e12,
    }
    got = {}
    for name, dtype in cases:
        _gpu_named(monkeypatch, name)
        got[(name, dtype)] = peak_flops_per_worker(dtype, 1, device="cuda")
    assert got == cases


def test_an_unknown_gpu_is_one_line_naming_it_and_the_rule(monkeypatch):
    monkeypatch.setattr(
        metrics, "measure_matmul_flops", _refuse("the CPU matmul measurement for a GPU")
    )
    for name in ("NVIDIA GeForce RTX 4090", "NVIDIA L4 (something new)", "H100"):
        _gpu_named(monkeypatch, name)
        with pytest.raises(UnknownGPUError) as e:
            peak_flops_per_worker("bf16", 1, device=torch.device("cuda", 0))
        msg = str(e.value)
        assert isinstance(e.value, ValueError) and "\n" not in msg
        assert f"'{name}'" in msg and "set trainer.peak_flops=<dense bf16 FLOP/s of one GPU>" in msg
    # A configured peak wins over the table and over the error.
    assert peak_flops_per_worker("bf16", 1, 4.2e14, device=torch.device("cuda", 0)) == 4.2e14
    _gpu_named(monkeypatch, "NVIDIA H100 80GB HBM3")
    assert peak_flops_per_worker("bf16", 1, 5e14, device="cuda") == 5e14


# ------------------------------------------------------------- batches on the engine's device


class DeviceEngine:
    """Records the devices of what a DeepSpeed engine would be handed (ZeRO-3: no comm
    timing patch); its device is `meta`, which needs no GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seen: list[tuple[str, str]] = []
        self.optimizer = type("Opt", (), {"optimizer": None, "step": lambda self: None})()

    def __call__(self, x, y):
        self.seen.append((x.device.type, y.device.type))
        return None, torch.tensor(1.0, requires_grad=True)

    def zero_optimization_stage(self):
        return 3

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def get_global_grad_norm(self):
        return 0.5

    def eval(self):
        pass

    def train(self):
        pass


def test_train_and_eval_batches_go_to_the_engines_device(gpu_host, monkeypatch):
    def no_pinning(self, *args, **kwargs):
        raise AssertionError("pin_memory() for a device that is not CUDA")

    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)
    batch = [(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))] * 2
    engine = DeviceEngine(torch.device("meta"))
    losses, norm, skipped = train_step(engine, batch, tp=1)
    assert engine.seen == [("meta", "meta")] * 2 and norm == 0.5 and not skipped
    engine.seen.clear()
    assert eval_losses(engine, batch) == [1.0, 1.0]
    assert engine.seen == [("meta", "meta")] * 2

    t = torch.ones(3)
    assert to_device(t, torch.device("cpu")) is t  # the CPU: no copy, no pinning
    cpu = DeviceEngine(torch.device("cpu"))
    train_step(cpu, batch, tp=1)
    assert cpu.seen == [("cpu", "cpu")] * 2


# --------------------------------------------------------------- weights drawn on the CPU


def test_init_weights_draws_on_the_cpu_for_parameters_elsewhere(monkeypatch):
    """Parameters on another device (`meta` here, CUDA in a GPU run) get exactly a CPU
    build's values: drawn on the CPU by the CPU generator, then copied into the parameter."""
    from models.gpt import GPT, GPTConfig

    cfg = GPTConfig(n_layer=1, d_model=16, n_head=2, vocab_size=32, block_size=8)
    reference = GPT(cfg)
    init_weights(reference, seed=3)
    with torch.device("meta"):
        model = GPT(cfg)
    params = {n: p for n, p in model.named_parameters()}
    drawn_on, landed = [], {}
    real_normal, real_copy = torch.nn.init.normal_, engine_mod._copy_to_device

    def normal_(tensor, *args, **kwargs):
        drawn_on.append(tensor.device.type)
        return real_normal(tensor, *args, **kwargs)

    def copy_to_device(param, values):
        landed[id(param)] = values.clone()  # the last copy into a parameter is what it holds
        real_copy(param, values)

    monkeypatch.setattr(torch.nn.init, "normal_", normal_)
    monkeypatch.setattr(engine_mod, "_copy_to_device", copy_to_device, raising=False)
    init_weights(model, seed=3)
    monkeypatch.undo()
    assert drawn_on and set(drawn_on) == {"cpu"}
    assert {n: p for n, p in model.named_parameters()} == params  # the same parameters
    assert all(p.device.type == "meta" for p in params.values())
    ref = dict(reference.named_parameters())
    assert set(ref) == set(params)
    for n, p in params.items():
        assert torch.equal(landed[id(p)], ref[n].data), n
    # CPU parameters: initialised in place as before (same storage, the generator's values).
    storages = {n: p.data_ptr() for n, p in reference.named_parameters()}
    init_weights(reference, seed=3)
    assert {n: p.data_ptr() for n, p in reference.named_parameters()} == storages
    g = torch.Generator().manual_seed(engine_mod._name_seed(3, "blocks.0.attn.q_proj"))
    want = torch.empty(16, 16).normal_(0.0, 0.02, generator=g)
    assert torch.equal(reference.blocks[0].attn.q_proj.weight.data, want)


def test_init_weights_draws_bf16_parameters_in_fp32_then_casts(monkeypatch):
    """A bf16 build (DeepSpeed's zero.Init makes its parameters bf16) gets the bf16 cast of an
    fp32 build's values: every draw is made into an fp32 tensor, in the parameter's storage."""
    from models.gpt import GPT, GPTConfig

    cfg = GPTConfig(n_layer=1, d_model=16, n_head=2, vocab_size=32, block_size=8)
    reference = GPT(cfg)
    init_weights(reference, seed=3)
    model = GPT(cfg).bfloat16()
    storages = {n: p.data_ptr() for n, p in model.named_parameters()}
    dtypes = []
    real_normal = torch.nn.init.normal_

    def normal_(tensor, *args, **kwargs):
        dtypes.append(tensor.dtype)
        return real_normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", normal_)
    init_weights(model, seed=3)
    monkeypatch.undo()
    assert dtypes and set(dtypes) == {torch.float32}
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == storages
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.dtype == torch.bfloat16 and torch.equal(p.data, q.data.bfloat16()), n


# ---------------------------------------------------------------- refused before Ray starts


def test_fractional_gpus_per_worker_is_one_line():
    with pytest.raises(ConfigError, match=r"gpus_per_worker \(0\.5\) must be a whole number") as e:
        load_config(["cluster=ray", "cluster.gpus_per_worker=0.5", "trainer.global_batch_size=64"])
    assert "\n" not in str(e.value)
    assert load_config(["cluster=ray", "trainer.global_batch_size=64"]).cluster.use_gpu


def test_nvme_offload_on_gpus_without_the_cuda_toolkit_is_one_line(monkeypatch, tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from trainer.driver.preflight import check_offload

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: True)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc on it
    nvme = [f"parallel.nvme_path={tmp_path / 'nv'}", "parallel=zero3-nvme"]
    gpu = load_config(["cluster=ray", "trainer.global_batch_size=64", *nvme])
    nowhere = str(tmp_path / "no-cuda")  # the default toolkit folder, absent
    with pytest.raises(ConfigError, match="needs the CUDA toolkit") as e:
        check_offload(gpu, default_cuda_home=nowhere)
    msg = str(e.value)
    assert "\n" not in msg and "CUDA_HOME" in msg and "offload_device=nvme" in msg
    check_offload(load_config(nvme), default_cuda_home=nowhere)  # CPU workers build nothing
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    check_offload(gpu, default_cuda_home=nowhere)
    monkeypatch.delenv("CUDA_HOME")
    (tmp_path / "nvcc").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "nvcc", 0o755)
    check_offload(gpu, default_cuda_home=nowhere)  # nvcc on PATH will do
    (tmp_path / "nvcc").unlink()
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("")
    check_offload(gpu, default_cuda_home=str(tmp_path / "cuda"))  # where torch looks last


def test_peak_table_covers_what_the_gpu_check_reports():
    """bench/gpu_check.py's MFU is against these: the machines this project is lent."""
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        half, single = metrics.GPU_PEAK_FLOPS[name]
        assert math.isclose(half, 989e12) and single < half


def test_the_cpu_comm_op_is_built_once_per_environment_with_a_message(
    tmp_path, monkeypatch, capsys
):
    """DeepSpeed's CPU comm op goes to a folder of this environment's own (two environments
    sharing torch's one folder rebuild it in turn), says so when it is about to be built, and
    a killed build's stale lock is cleared."""
    import deepspeed

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "x")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")  # undone to "unset" after the test
    monkeypatch.setenv("RAYGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: None)

    engine_mod._init_distributed()
    here = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    assert here.parent == tmp_path / "torch_extensions"
    assert "building DeepSpeed's CPU comm op, once per environment" in capsys.readouterr().out

    op = here / "deepspeed_shm_comm"  # where torch builds it under TORCH_EXTENSIONS_DIR
    op.mkdir(parents=True)
    lock = op / "lock"
    lock.write_text("")  # a build under way (fresh): kept
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    engine_mod._init_distributed()
    assert lock.exists()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # a killed build's: cleared
    (op / "deepspeed_shm_comm.so").write_bytes(b"")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    capsys.readouterr()
    engine_mod._init_distributed()
    assert Path(os.environ["TORCH_EXTENSIONS_DIR"]) == here  # the same environment: same folder
    assert "building" not in capsys.readouterr().out  # built already: nothing said
    assert not lock.exists()

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    bin_dir = tmp_path / "bin"  # another ninja first on PATH (a venv's): its own folder
    bin_dir.mkdir()
    (bin_dir / "ninja").write_text("#!/bin/sh\n")
    (bin_dir / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    engine_mod._init_distributed()
    other_ninja = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    assert other_ninja.parent == here.parent and other_ninja != here

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another-venv"))
    engine_mod._init_distributed()
    assert Path(os.environ["TORCH_EXTENSIONS_DIR"]).parent == here.parent
    assert Path(os.environ["TORCH_EXTENSIONS_DIR"]) not in (here, other_ninja)

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert engine_mod.comm_op_build_dir() is None  # the user's folder is kept
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")
