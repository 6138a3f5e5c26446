"""precision=auto: bf16 where the workers' hardware runs it natively, fp32 elsewhere.

The table (`choose`): CUDA workers take bf16 when torch.cuda.is_bf16_supported(), else fp32;
CPU workers take bf16 when the CPU has a native bf16 matmul (/proc/cpuinfo flag amx_bf16 or
avx512_bf16), else fp32 (emulated bf16 is many times slower than fp32). fp16 is never chosen:
its loss scaling is something a user asks for (precision=fp16).

Where it is resolved: on the driver, once, for the hardware the WORKERS run on, before
anything depends on it (preflight, the resume plan, the peak FLOP/s, the workers' config), so
every rank trains in the same precision and the checkpoint records the one used:
- a resume keeps the precision its checkpoint recorded (precision=<name> on the resume
  command changes it, as any explicit value does);
- the workers run on this machine (cluster.launch=process, or CPU workers of the private local
  Ray): its CUDA device or /proc/cpuinfo, read here;
- otherwise (GPU workers, a joined cluster): a Ray task with one worker's resources
  (cluster.cpus_per_worker / gpus_per_worker), scheduled where a worker would run, reports
  its hardware (`probe`), after Ray is up.
The choice is printed once: `precision: auto -> fp32 (...)`. A worker handed an unresolved
config (a direct caller of trainer/worker/loop.py's Trainer) resolves it for its own device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from trainer.config import PrecisionConfig, RootConfig, validate

# CPU flags of a native bf16 matmul (oneDNN uses them); without one, bf16 is emulated.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> Optional[set[str]]:
    """This machine's CPU flags (Linux), None where they cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def choose(hardware: dict[str, Any]) -> tuple[str, str]:
    """(precision name, why) for workers with `hardware` (`probe`'s dict: "cuda" True for
    CUDA workers, then "cuda_bf16" and "gpu"; "cpu_flags" a list, or None if unreadable)."""
    if hardware.get("cuda"):
        gpu = hardware.get("gpu") or "the GPU"
        if hardware.get("cuda_bf16"):
            return "bf16", f"{gpu} supports bf16"
        return "fp32", f"{gpu} has no bf16 (auto never picks fp16: ask for precision=fp16)"
    flags = hardware.get("cpu_flags")
    if flags is None:
        return "fp32", "CPU workers whose CPU flags could not be read"
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if native:
        return "bf16", f"CPU workers with native bf16 ({native[0]})"
    return "fp32", (
        f"CPU workers without native bf16, no {' / '.join(NATIVE_BF16_FLAGS)}: bf16 would be "
        "emulated, many times slower"
    )


def probe(use_gpu: bool) -> dict[str, Any]:
    """This process's hardware as `choose` reads it (runs on a worker node as a Ray task)."""
    flags = cpu_flags()
    found: dict[str, Any] = {
        "cuda": False,
        "cpu_flags": sorted(flags) if flags is not None else None,
    }
    if use_gpu:
        import torch

        if torch.cuda.is_available():
            found.update(
                cuda=True,
                cuda_bf16=bool(torch.cuda.is_bf16_supported()),
                gpu=torch.cuda.get_device_name(0),
            )
    return found


def precision_config(name: str) -> PrecisionConfig:
    """The PrecisionConfig of a concrete choice, as conf/precision/<name>.yaml makes it."""
    return PrecisionConfig(name=name, bf16=name == "bf16", fp16=name == "fp16")


def with_precision(cfg: RootConfig, name: str, why: str, *, echo: bool = True) -> RootConfig:
    """cfg with precision=auto replaced by `name` (validated again: the cross-group rules that
    depend on it), printing the choice once."""
    old = cfg.precision
    new = dataclasses.replace(precision_config(name), initial_scale_power=old.initial_scale_power)
    out = dataclasses.replace(cfg, precision=new)
    validate(out)
    if echo:
        print(f"precision: auto -> {name} ({why})", flush=True)
    return out


def saved_precision(saved_cfg: Optional[dict[str, Any]]) -> Optional[str]:
    """The precision a checkpoint's recorded config trained in (None if it does not say)."""
    section = saved_cfg.get("precision") if isinstance(saved_cfg, dict) else None
    if not isinstance(section, dict):
        return None
    if section.get("bf16"):
        return "bf16"
    if section.get("fp16"):
        return "fp16"
    return "fp32" if section.get("name") not in (None, "auto") else None


def _resumed_config(cfg: RootConfig) -> Optional[dict[str, Any]]:
    from trainer.checkpoint.format import read_trainer_state
    from trainer.checkpoint.index import latest

    try:
        found = latest(cfg.run_uri, hashes=False)
        if found.uri is None:
            return None
        return read_trainer_state(found.uri).get("config")
    except Exception:  # noqa: BLE001 - the resume plan reports a damaged checkpoint itself
        return None


def workers_are_here(cfg: RootConfig) -> bool:
    """The workers run on this machine's hardware as this process sees it."""
    c = cfg.cluster
    return c.in_process or (c.address is None and not c.use_gpu)


def resolve_before_ray(cfg: RootConfig) -> RootConfig:
    """precision=auto resolved where it can be without Ray: from the checkpoint a resume
    continues, or from this machine when the workers run on it. Otherwise cfg unchanged
    (resolve_on_cluster does it once Ray is up)."""
    if cfg.precision.name != "auto":
        return cfg
    kept = saved_precision(_resumed_config(cfg))
    if kept is not None:
        return with_precision(cfg, kept, "kept from the checkpoint this run resumes")
    if workers_are_here(cfg):
        return with_precision(cfg, *choose(probe(cfg.cluster.use_gpu)))
    return cfg


def resolve_on_cluster(cfg: RootConfig) -> RootConfig:
    """precision=auto still open (GPU workers, a joined cluster): a Ray task with one
    worker's resources reports its hardware. Ray must be up."""
    if cfg.precision.name != "auto":
        return cfg
    from cluster.launch import run_as_worker

    c = cfg.cluster
    hardware = run_as_worker(probe, c, c.use_gpu)
    name, why = choose(hardware)
    return with_precision(cfg, name, f"{why}, on a worker node")
