"""Every patch raygpt applies to DeepSpeed objects, in this one file.

Each one replaces an attribute of a live DeepSpeed object (never a module-level function),
except the Muon stand-in, which stands in for two whole modules that raygpt never uses; each
says which DeepSpeed behaviour it works around. When DeepSpeed changes, this is the file to
read. Callers import the context managers and installers from here.

- no Muon import: DeepSpeed's Muon modules are replaced by stand-ins before an engine is
  built (without_muon_import).

- gradient-reduction timing: wraps engine.allreduce_gradients and the ZeRO-1/2 optimizer's
  reduce_ipg_grads (time_gradient_reduction).
- guarded skip: the innermost torch optimizer's step becomes a no-op for one engine.step()
  (skipped_optimizer_step).
- safe loading: the engine's checkpoint_engine.load becomes a weights_only torch.load
  (weights_only_load).
- universal checkpoints: engine._config.load_universal_checkpoint for one load
  (universal_checkpoint_load).
- snapshot saves: the engine's checkpoint_engine.save snapshots into host memory for one save
  (buffered_saves), the file written later.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

from trainer.checkpoint.format import EnginePatches

MUON_MODULES = (
    "deepspeed.runtime.zero.muon.original_muon",
    "deepspeed.runtime.zero.muon.muon_optimizer",
)


def without_muon_import() -> None:
    """DeepSpeed's ZeRO and bf16 optimizers import its Muon optimizer module to ask whether the
    optimizer is a Muon one (isinstance), and ZeRO-1/2 imports Muon's update function when it
    flattens partitions. That module compiles its kernels with torch.compile on import, which
    imports inductor: 1.6 s of a 10 s start on a CPU. raygpt builds only the torch optimizers
    of trainer/worker/optimizer.py (OPTIMIZERS), none a Muon one, so the answer is always no:
    this puts stand-ins in sys.modules whose Muon class nothing is an instance of and whose
    update refuses to run. A module already imported
    (someone wanted the real one) is left as it is."""

    class MuonWithAuxAdam:  # never instantiated: isinstance(x, MuonWithAuxAdam) is False
        pass

    def muon_update(*args, **kwargs):
        raise RuntimeError("raygpt does not build DeepSpeed's Muon optimizer (optim.name)")

    for name in MUON_MODULES:
        if name not in sys.modules:
            stand_in = types.ModuleType(name, "raygpt's stand-in: Muon is never built")
            stand_in.MuonWithAuxAdam = MuonWithAuxAdam
            stand_in.muon_update = muon_update
            sys.modules[name] = stand_in


def innermost_optimizer(opt):
    """DeepSpeed wraps the torch optimizer (ZeRO, bf16); the innermost one updates the
    parameters and owns the states."""
    seen = set()
    while getattr(opt, "optimizer", None) is not None and id(opt) not in seen:
        seen.add(id(opt))
        opt = opt.optimizer
    return opt


@contextlib.contextmanager
def skipped_optimizer_step(engine) -> Iterator[None]:
    """engine.step() inside this context does DeepSpeed's bookkeeping (micro-step counters,
    gradient clearing, ZeRO partition copies) but the torch optimizer changes nothing."""
    inner = innermost_optimizer(engine.optimizer)
    original = inner.step
    inner.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        inner.step = original


def _timed(fn: Callable, timing: dict[str, Any]) -> Callable:
    """fn, its time added to timing["timer"]'s "comm" phase; nested calls count once."""

    def wrapper(*args, **kwargs):
        timer = timing.get("timer")
        if timer is None or timing["depth"]:
            return fn(*args, **kwargs)
        timing["depth"] += 1
        try:
            with timer.phase("comm"):
                return fn(*args, **kwargs)
        finally:
            timing["depth"] -= 1

    return wrapper


def time_gradient_reduction(engine, timer) -> None:
    """Times this engine's gradient reduction as the "comm" phase of `timer` (installed once).

    What DeepSpeed offers is not usable per step: its engine timers need wall_clock_breakdown,
    which prints a line every step, and its comms logger (comms_logger) keeps every latency
    forever and records cumulative sums. So we time the engine's own reduce entry points:
    engine.allreduce_gradients (ZeRO-0: the all-reduce; ZeRO-1: reduce at the accumulation
    boundary; ZeRO-2: the last bucket) and optimizer.reduce_ipg_grads (ZeRO-1/2 buckets
    reduced from backward hooks). The figure includes their bucket copies and is part of
    backward_time_s. Not measured, so the key is absent: ZeRO-3 (its parameter all-gathers are
    asynchronous prefetches whose waits land inside forward/backward, so a gradient-only
    figure would mislead), CUDA (reductions run on side streams: host time is launch time),
    the tensor-parallel all-reduces inside forward/backward, and the ZeRO-1/2 all-gather of
    updated parameters inside the optimizer step.
    """
    timing = getattr(engine, "_raygpt_comm_timing", None)
    if timing is None:
        timing = {"timer": None, "depth": 0}
        engine._raygpt_comm_timing = timing
        if not timer.cuda and engine.zero_optimization_stage() <= 2:
            engine.allreduce_gradients = _timed(engine.allreduce_gradients, timing)
            if hasattr(engine.optimizer, "reduce_ipg_grads"):
                engine.optimizer.reduce_ipg_grads = _timed(
                    engine.optimizer.reduce_ipg_grads, timing
                )
    timing["timer"] = timer


@contextlib.contextmanager
def weights_only_load(engine, load: Callable) -> Iterator[None]:
    """DeepSpeed's checkpoint engine loads with weights_only=False; inside this context it
    loads with `load` (trainer.checkpoint.format.safe_torch_load) instead."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        yield
        return
    original = ce.load
    ce.load = load
    try:
        yield
    finally:
        ce.load = original


@contextlib.contextmanager
def universal_checkpoint_load(engine) -> Iterator[None]:
    """engine.load_checkpoint inside this context reads a universal checkpoint. DeepSpeed
    reads this flag from its config at load time only; it is set for this load alone."""
    engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = False


@contextlib.contextmanager
def buffered_saves(engine, sink: Callable[[str, Callable[[str], None]], None]) -> Iterator[None]:
    """DeepSpeed writes every state file of a checkpoint (model, optimizer shards, pipeline
    layers) through engine.checkpoint_engine.save(state_dict, path), a torch.save. Inside this
    context each state dict is snapshotted in host memory instead (host_snapshot) and
    sink(path, write) receives a `write(path)` that torch.saves the snapshot: the same file,
    byte for byte, written later (trainer/checkpoint/manager.py runs it in the background)."""
    import torch

    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        yield
        return
    zipfile = getattr(ce, "zipfile_serialization", True)

    def save(state_dict, path: str) -> None:
        snapshot = host_snapshot(state_dict)
        sink(path, lambda p: torch.save(snapshot, p, _use_new_zipfile_serialization=zipfile))

    original = ce.save
    ce.save = save
    try:
        yield
    finally:
        ce.save = original


def host_snapshot(obj: Any, memo: Any = None) -> Any:
    """A copy of a state dict whose tensors own a copy of their storage in host memory (pinned
    for a GPU's): torch.save writes of it exactly what it would have written of `obj` then,
    whatever the training does to `obj` afterwards. Tensors that shared a storage share its
    copy (as torch.save keys them: by the storage itself); containers are rebuilt, other values
    deep-copied."""
    import copy

    import torch

    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        new = memo.get(storage._cdata)
        if new is None:
            if storage.device.type == "cpu":
                new = storage.clone()
            else:
                new = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=True)
                new = new.untyped_storage()
                new.copy_(storage)
            memo[storage._cdata] = new
        out = torch.empty(0, dtype=obj.dtype, device=new.device)
        out.set_(new, obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=obj.requires_grad)
        return out.requires_grad_(obj.requires_grad) if obj.requires_grad else out
    if isinstance(obj, dict):
        out = copy.copy(obj)
        out.clear()
        out.update((k, host_snapshot(v, memo)) for k, v in obj.items())
        return out
    if isinstance(obj, list):
        return [host_snapshot(v, memo) for v in obj]
    if isinstance(obj, tuple):
        items = [host_snapshot(v, memo) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return copy.deepcopy(obj)


# What trainer/checkpoint/ needs patched to save and load a checkpoint, handed to its manager.
ENGINE_PATCHES = EnginePatches(
    weights_only=weights_only_load,
    universal=universal_checkpoint_load,
    buffered_saves=buffered_saves,
)
