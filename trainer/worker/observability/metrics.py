"""Throughput, MFU and memory figures."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

import torch

from trainer.worker.ds_patches import innermost_optimizer

# Dense peak FLOP/s of one GPU from its datasheet (no sparsity): (bf16/fp16 tensor core, fp32
# without TF32), keyed by torch.cuda.get_device_name() EXACTLY: the same chip name covers
# parts with different clocks and power (H100 SXM 989e12, PCIe 756e12, NVL 835e12 bf16), and a
# prefix would match "NVIDIA L4" inside "NVIDIA L40". A name not here needs
# trainer.peak_flops: an MFU against a guessed peak would be a wrong number that looks right.
GPU_PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "NVIDIA H200": (989e12, 67e12),
    "NVIDIA H200 NVL": (835e12, 60e12),
    "NVIDIA GH200 480GB": (989e12, 67e12),
    "NVIDIA H100 80GB HBM3": (989e12, 67e12),  # SXM5
    "NVIDIA H100 PCIe": (756e12, 51e12),
    "NVIDIA H100 NVL": (835e12, 60e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 19.5e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 19.5e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 19.5e12),
    "NVIDIA A100 80GB PCIe": (312e12, 19.5e12),
    "NVIDIA L40S": (362e12, 91.6e12),
    "NVIDIA L40": (181e12, 90.5e12),
    "NVIDIA L4": (121e12, 30.3e12),
    "NVIDIA A10G": (125e12, 31.2e12),
    "NVIDIA A10": (125e12, 31.2e12),
}


class UnknownGPUError(ValueError):
    """A GPU with no datasheet peak in GPU_PEAK_FLOPS and no trainer.peak_flops; str() is one
    line naming the GPU and the rule."""


def gpu_peak_flops(dtype: str, device: Any = None) -> float:
    """Datasheet peak FLOP/s of the GPU `device` (None: the current one) for `dtype`;
    UnknownGPUError for a name not in GPU_PEAK_FLOPS."""
    name = torch.cuda.get_device_name(device)
    if name not in GPU_PEAK_FLOPS:
        raise UnknownGPUError(
            f"no datasheet peak FLOP/s for GPU '{name}' (MFU needs one): set "
            f"trainer.peak_flops=<dense {dtype} FLOP/s of one GPU>"
        )
    half, single = GPU_PEAK_FLOPS[name]
    return half if dtype in ("bf16", "fp16") else single


def matmul_flops(dtype: str, threads: int, n: int = 2048, seconds: float = 1.2) -> float:
    """Dense n x n matmul FLOP/s with `threads` torch threads, measured now: the best of three
    windows of seconds / 3 each. On a CPU without native bf16 (AVX2 only) a 2048 bf16 matmul
    takes about a minute, so n grows from 256 only while one product takes a small part of a
    window."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.bfloat16, "fp32": torch.float32}[dtype]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        size = min(256, n)
        while True:
            a = torch.randn(size, size, dtype=torch_dtype)
            b = torch.randn(size, size, dtype=torch_dtype)
            a @ b  # warm-up (oneDNN/AMX kernel selection)
            t0 = time.perf_counter()
            a @ b
            # the next size takes 8x as long: grow only while that still fits a window's sixth
            if size >= n or 8 * (time.perf_counter() - t0) > seconds / 6:
                break
            size *= 2
        n = size
        best = 0.0
        for _ in range(3):
            iters, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 3:
                a @ b
                iters += 1
            best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(old)
    return best


def cache_dir() -> Path:
    """raygpt's per-machine cache (measured peak, DeepSpeed's built ops): RAYGPT_CACHE, default
    ~/.cache/raygpt."""
    return Path(os.environ.get("RAYGPT_CACHE", Path.home() / ".cache" / "raygpt"))


def measure_matmul_flops(dtype: str, threads: int, seconds: float = 1.2) -> float:
    """Measured dense matmul FLOP/s of this CPU with `threads` threads, cached per machine.

    2048 x 2048 operands (1024 reach only ~60% of the AMX bf16 rate), the best of three
    windows: a neighbour's burst on a shared machine only ever lowers a window, and a peak
    measured low would overstate every MFU figure of every later run."""
    cache = cache_dir() / "peak.json"
    n = 2048

    def key(t: int) -> str:
        return f"{platform.node()}|{platform.processor()}|{os.cpu_count()}|{t}|{dtype}|n{n}x3"

    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key(threads) in known:
        flops = float(known[key(threads)])
    else:
        flops = matmul_flops(dtype, threads, n=n, seconds=seconds)
        known[key(threads)] = flops
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, indent=1))
        except OSError:
            pass
    # More threads never have a lower peak than fewer: a figure measured while the machine
    # was busy (2 threads at 11 GFLOP/s next to 1 thread at 26 on this one) is raised to it.
    fewer = [float(known[key(t)]) for t in range(1, threads) if key(t) in known]
    return max([flops, *fewer])


def peak_flops_per_worker(
    dtype: str, threads: int, configured: Optional[float] = None, *, device: Any = None
) -> float:
    """The FLOP/s one worker could reach: `configured` (trainer.peak_flops) when set; on a
    CUDA `device` (the engine's) its datasheet figure (UnknownGPUError for a GPU not in the
    table: never a CPU measurement); on a CPU device the measured, per-machine cached matmul
    rate of `threads` threads. The device decides, not what the host happens to have."""
    if configured:
        return configured
    if device is not None and torch.device(device).type == "cuda":
        return gpu_peak_flops(dtype, device)
    peak = measure_matmul_flops(dtype, threads)
    if dtype != "fp32":
        # A CPU without native bf16 (AVX2 only) emulates it at ~1/50 of its fp32 rate; what
        # the hardware can do is then its fp32 rate (else MFU reads above 100%).
        peak = max(peak, measure_matmul_flops("fp32", threads))
    return peak


def memory_stats(device: Any = None) -> dict[str, float]:
    """This process's memory in MiB: RSS now and its high-water mark, and on a GPU the CUDA
    allocator's figures (allocated now, reserved by the caching allocator, peak allocated).

    device: the engine's device; the CUDA figures come with a CUDA device only (a CPU worker
    on a GPU host reports none). None keeps the older rule, CUDA figures wherever CUDA is
    available: callers should pass the device."""
    import psutil

    rss = psutil.Process().memory_info().rss / 2**20
    # The kernel's high-water mark is updated lazily and can trail the current RSS a little.
    stats = {"rss_mib": rss, "peak_rss_mib": max(peak_rss_mib(), rss)}
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if cuda:
        stats.update(
            cuda_allocated_mib=torch.cuda.memory_allocated() / 2**20,
            cuda_reserved_mib=torch.cuda.memory_reserved() / 2**20,
            cuda_peak_mib=torch.cuda.max_memory_allocated() / 2**20,
        )
    return stats


class StepTimes:
    """Where the steps since the last `lap` spent their time: seconds per step in data wait,
    forward, backward, optimizer step and gradient communication (`phase` names are free).

    CPU: the host clock, exact because every op (gloo collectives included) is synchronous.
    CUDA: events recorded on the current stream and read only in `lap`, which the loop calls
    on logged steps right where it reads the loss anyway: no host sync per step.
    """

    ORDER = ("data", "forward", "backward", "comm", "optimizer")

    def __init__(self, cuda: bool = False):
        """cuda: the steps run on a CUDA device (the engine's device says so; whether the
        host has a GPU does not)."""
        self.cuda = cuda
        self._seconds: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []
        self._steps = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def step(self) -> None:
        self._steps += 1

    def lap(self) -> dict[str, float]:
        """{"<phase>_time_s": mean seconds per step} since the last lap; then starts afresh."""
        if self._events:
            self._events[-1][2].synchronize()  # one stream: the last event ends after the rest
            for name, start, end in self._events:
                self.add(name, start.elapsed_time(end) / 1000)
        steps = max(self._steps, 1)
        order = {name: i for i, name in enumerate(self.ORDER)}
        names = sorted(self._seconds, key=lambda n: order.get(n, len(order)))
        out = {f"{name}_time_s": self._seconds[name] / steps for name in names}
        self._seconds, self._events, self._steps = {}, [], 0
        return out


class Throughput:
    """Training tokens/s and MFU over the steps since the last call to `lap` (the time inside
    `paused()`: eval, checkpoints, traces, is left out; end-to-end figures include it)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops_total: float):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self._t = time.perf_counter()
        self._steps = 0
        self._paused = 0.0
        self.paused_total = 0.0  # seconds of eval and checkpoints over the whole run

    def step(self) -> None:
        self._steps += 1

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (eval, checkpoints) does not count against training throughput."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0
            self.paused_total += time.perf_counter() - t0

    def lap(self) -> dict[str, float]:
        now = time.perf_counter()
        dt, steps = max(now - self._t - self._paused, 1e-9), max(self._steps, 1)
        self._t, self._steps, self._paused = now, 0, 0.0
        tps = self.tokens_per_step * steps / dt
        return {
            "tokens_per_sec": tps,
            "step_time_s": dt / steps,
            "mfu": tps * self.flops_per_token / self.peak,
        }


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes of model state this rank holds: parameters (ZeRO-3: its partition), and the
    optimizer's own tensors (fp32 master copies when separate, Adam moments)."""
    seen: set[int] = set()
    params = 0
    for p in engine.module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += _nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _nbytes(p)
    inner = innermost_optimizer(engine.optimizer)
    master = moments = 0
    for group in inner.param_groups:
        for p in group["params"]:
            if id(p) not in seen:  # a separate (fp32) master copy, not the model's own tensor
                seen.add(id(p))
                master += _nbytes(p)
            for v in inner.state.get(p, {}).values():
                if torch.is_tensor(v) and v.dim() > 0:
                    moments += _nbytes(v)
    return {"param_bytes": params, "master_bytes": master, "optim_state_bytes": moments}


def peak_rss_mib() -> float:
    """High-water RSS of this process (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
