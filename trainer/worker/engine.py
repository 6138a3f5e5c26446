"""DeepSpeed engine construction: the only place deepspeed.initialize is called."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from models.gpt import GPT, GPTConfig
from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig
from trainer.worker.ds_patches import (
    skipped_optimizer_step,
    time_gradient_reduction,
    without_muon_import,
)
from trainer.worker.kernels import use_contiguous_weight_grad
from trainer.worker.observability.metrics import StepTimes, cache_dir
from trainer.worker.optimizer import build_optimizer
from trainer.worker.parallel import (
    Layout,
    apply_ac,
    apply_ac_blocks,
    apply_compile,
    apply_pp,
    apply_sp,
    apply_tp,
    apply_tp_blocks,
    apply_zero,
    compile_on,
)

if TYPE_CHECKING:
    from trainer.worker.guard import StepJudge


def deepspeed_config(
    model: GPTConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    optim: OptimConfig,
    *,
    layout: Layout,
    micro_batch: int,
    grad_accum: int,
    device_type: str = "cpu",
    ac_blocks: int = 0,
) -> dict[str, Any]:
    """The one DeepSpeed JSON config of a run: the batch, clipping and precision keys merged
    with the fragments of trainer/worker/parallel.py's apply_zero, apply_tp and apply_ac. Pure:
    unit-tested without a process group. device_type: the accelerator's ("cuda" | "cpu",
    accelerator_device_type()). ac_blocks: the blocks activation_checkpointing "auto" chose
    (parallel.py plan_ac)."""
    base: dict[str, Any] = {
        # DeepSpeed counts sequence-parallel ranks as data-parallel ones (Layout.deepspeed_dp)
        "train_batch_size": micro_batch * grad_accum * layout.deepspeed_dp,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": precision.bf16},
        "fp16": {
            "enabled": precision.fp16,
            "loss_scale": 0,
            "initial_scale_power": precision.initial_scale_power,
        },
        # We pass a torch optimizer (build_optimizer): DeepSpeed's own Adams need compiled ops.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if (
        device_type == "cuda"
        and precision.bf16
        and precision.fp32_grad_accum
        and parallel.zero_stage in (1, 2)
        and layout.pp == 1
    ):
        # DeepSpeed takes it at ZeRO-1 (its BF16_Optimizer) and 2 (a separate fp32 accumulation);
        # ZeRO-0 raises on it and ZeRO-3 ignores it. Pipelines keep their bf16 ZeRO-1 optimizer.
        base["data_types"] = {"grad_accum_dtype": "fp32"}
    return merge_config(
        base,
        apply_zero(parallel, device_type=device_type),
        apply_tp(layout),
        apply_ac(model, parallel, layout, ac_blocks),
    )


def merge_config(*fragments: dict[str, Any]) -> dict[str, Any]:
    """The fragments' top-level keys, later ones winning; a None value removes its key."""
    out: dict[str, Any] = {}
    for fragment in fragments:
        for key, value in fragment.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
    return out


def _name_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


def init_weights(model: GPT, seed: int, gather=None) -> None:
    """(Re)initialises every module from its own generator, seeded by (seed, module name), so
    the weights do not depend on how the model was built: whole, or partitioned as it is built
    (ZeRO-3), which draws from the global RNG differently, nor on the device the parameters
    live on (the draws are made on the CPU, where the generator is, and copied to the
    parameters' device: a GPU build gets a CPU build's values), nor on their dtype (drawn in
    fp32, then cast: a bf16 build gets a fp32 build's values in bf16). `gather(params)` is a context
    that makes a module's parameters whole while it is initialised."""
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        generator = torch.Generator().manual_seed(_name_seed(seed, name))
        with gather(own) if gather else contextlib.nullcontext(), _drawn_on_cpu(module):
            model.init_module_weights(module, generator=generator)


@contextlib.contextmanager
def _drawn_on_cpu(module: torch.nn.Module):
    """Inside: each of the module's own parameters that is not an fp32 CPU tensor is replaced
    by an fp32 CPU parameter of its shape (a CPU torch.Generator cannot fill a CUDA tensor, and
    a bf16 draw need not round like an fp32 draw cast to bf16); after: the values drawn into it
    are copied (cast) into the parameter's own storage on its device, and the parameter is
    back. So a bf16 ZeRO-3 partitioned build holds bit for bit the bf16 cast of a whole fp32
    build, which is what DeepSpeed makes of a whole build. fp32 CPU parameters are initialised
    in place, as they always were."""
    params = module._parameters
    away = {
        k: p
        for k, p in params.items()
        if p is not None and (p.device.type != "cpu" or p.dtype != torch.float32)
    }
    for k, p in away.items():
        params[k] = torch.nn.Parameter(
            torch.empty(p.data.shape, dtype=torch.float32), requires_grad=p.requires_grad
        )
    try:
        yield
    finally:
        for k, p in away.items():
            drawn, params[k] = params[k], p
            _copy_to_device(p, drawn.data)


def _copy_to_device(param: torch.nn.Parameter, values: torch.Tensor) -> None:
    param.data.copy_(values)


def build_model(
    model_cfg: GPTConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    optim: OptimConfig,
    *,
    seed: int,
    layout: Layout,
    micro_batch: int,
    grad_accum: int,
) -> GPT:
    """The GPT for this rank, with weights that depend only on `seed` (or model.init_from).
    With parallel.partitioned_init (ZeRO-3) no rank ever holds the whole model: modules are
    partitioned as they are built (deepspeed.zero.Init) and initialised one module at a time
    on gathered weights, to exactly the values of a whole build."""
    _init_distributed()
    if not parallel.partitioned_init:
        model = GPT(model_cfg)
        init_weights(model, seed)
        if model_cfg.init_from:
            from trainer.init_from import load_hf_weights

            load_hf_weights(model, model_cfg.init_from)
        return model
    import deepspeed

    sizes = dict(layout=layout, micro_batch=micro_batch, grad_accum=grad_accum)
    device = accelerator_device_type()
    ds_config = deepspeed_config(model_cfg, parallel, precision, optim, **sizes, device_type=device)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = GPT(model_cfg)

    def gather(params):
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    init_weights(model, seed, gather)
    if model_cfg.init_from:  # gathers the whole model once: fine-tuning sizes only
        from trainer.init_from import load_hf_weights

        with gather(list(model.parameters())):
            load_hf_weights(model, model_cfg.init_from)
    return model


def accelerator_device_type() -> str:
    """The device type of DeepSpeed's accelerator ("cuda", "cpu"): DS_ACCELERATOR, which
    cluster/launch.py's worker_env sets from cluster.gpus_per_worker. Never what the host
    happens to have: CPU workers on a GPU host stay on the CPU."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name()).type


def comm_backend() -> str:
    """The process group's backend: DeepSpeed's accelerator's (nccl on CUDA, gloo on CPU)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().communication_backend_name()


# A DeepSpeed build lock older than this is a killed build's: removed, or every later build waits.
STALE_BUILD_LOCK_S = 600


def comm_op_build_dir() -> Optional[Path]:
    """Where DeepSpeed's CPU shared-memory comm op is built, once per environment.

    DeepSpeed JIT-compiles it (~40 s on 2 cores) into torch's extension folder, shared by every
    environment of the user (~/.cache/torch_extensions/py311_cpu); its build flags name the
    environment's paths, so two environments (two clones, two venvs) take turns rebuilding it.
    Each environment gets its own folder instead, keyed by its interpreter prefix, its torch and
    DeepSpeed versions and the ninja torch runs (the first on PATH: ninja 1.13, which pip puts in
    a venv's bin, and ninja 1.11 of /usr/bin each discard the other's build log and rebuild, so
    processes with and without the venv on PATH took turns rebuilding one folder), under
    RAYGPT_CACHE (default ~/.cache/raygpt). A TORCH_EXTENSIONS_DIR the
    user set is kept. Sets TORCH_EXTENSIONS_DIR and returns the op's folder; None when the
    accelerator is not the CPU (no such op) or the user chose the folder."""
    if accelerator_device_type() != "cpu" or os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    import deepspeed

    ninja = shutil.which("ninja")
    ninja = str(Path(ninja).resolve()) if ninja else None
    key = f"{Path(sys.prefix).resolve()}|{torch.__version__}|{deepspeed.__version__}|{ninja}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = cache_dir() / "torch_extensions" / digest
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    return root


def _init_distributed() -> None:
    import deepspeed

    build_dir = comm_op_build_dir()
    if build_dir is not None:
        op = build_dir / "deepspeed_shm_comm"  # torch builds in TORCH_EXTENSIONS_DIR/<name>
        lock = op / "lock"
        with contextlib.suppress(OSError):
            if time.time() - lock.stat().st_mtime > STALE_BUILD_LOCK_S:
                lock.unlink()
        if not (op / "deepspeed_shm_comm.so").exists() and os.environ.get("LOCAL_RANK", "0") == "0":
            print(
                "building DeepSpeed's CPU comm op, once per environment (~40 s on 2 cores) "
                f"in {build_dir}",
                flush=True,
            )
    deepspeed.init_distributed(dist_backend=comm_backend())


def build_engine(
    model: GPT,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    optim: OptimConfig,
    *,
    layout: Layout,
    micro_batch: int,
    grad_accum: int,
    compile: bool | str = False,
    contiguous_weight_grad: bool = False,
    loss_chunk: int = 0,
    ac_blocks: int = 0,
):
    """Wraps `model` in a DeepSpeed engine for `layout` (the process group must exist): the
    module pieces of trainer/worker/parallel.py (apply_pp, apply_compile) applied from outside,
    the optimizer of build_optimizer, and the one config of deepspeed_config.
    compile: torch.compile the model's blocks first (apply_compile); "auto": compile_on.
    contiguous_weight_grad: trainer/worker/kernels.py's Linear backward for the large layers.
    loss_chunk: tokens per chunk of the loss (models/loss.py; trainer.loss_chunk_tokens), 0 for
    the loss of the whole logits.
    ac_blocks: checkpoint the first this many blocks from outside the model (plan_ac's choice
    for activation_checkpointing "auto"; a pipeline checkpoints its layers instead, apply_ac)."""
    import deepspeed

    without_muon_import()
    _init_distributed()
    sizes = dict(layout=layout, micro_batch=micro_batch, grad_accum=grad_accum)
    device = accelerator_device_type()
    ds_config = deepspeed_config(
        model.config, parallel, precision, optim, **sizes, device_type=device, ac_blocks=ac_blocks
    )
    model.loss_chunk = loss_chunk
    if layout.pp == 1:
        apply_ac_blocks(model, ac_blocks)
    rank = torch.distributed.get_rank()
    module = apply_sp(apply_tp_blocks(model, layout, rank), layout, rank)
    module = apply_pp(module, layout, parallel)
    if contiguous_weight_grad:
        use_contiguous_weight_grad(module)
    module = apply_compile(
        module, compile_on(compile, device, layout, parallel), eager_first=ac_blocks
    )
    use_tf32(precision, device)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=build_optimizer(module, optim, device_type=device),
        config=ds_config,
        dist_init_required=False,
    )
    return engine


def use_tf32(precision: PrecisionConfig, device_type: str) -> None:
    """precision.tf32 on CUDA: fp32 matmuls in TF32 (torch's float32 matmul precision "high").
    The CPU keeps "highest", torch's default (oneDNN would otherwise use reduced precision)."""
    if device_type == "cuda" and precision.tf32:
        torch.set_float32_matmul_precision("high")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on the engine's device (pinned and non-blocking from host memory to a GPU)."""
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def batches_to_device(
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (x, y) of a step on the engine's device (the loader yields host tensors)."""
    return [(to_device(x, device), to_device(y, device)) for x, y in micro_batches]


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def _local_grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The 2-norm of the module's gradients, left on their device (read when it is logged)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))


def train_step(
    engine,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    tp: int,
    judge: StepJudge | None = None,
    poison: bool = False,
    timer: StepTimes | None = None,
    norm: bool = True,
):
    """One optimizer step over this rank's micro batches; returns (losses, grad norm, skipped).
    The losses are device tensors; the norm a float, a device tensor or None.

    judge (trainer/worker/guard.py's StepJudge): judge.start(losses) after the last forward,
    judge.verdict() after its backward, before the optimizer steps; the verdict is the same
    on every rank (it sees the all-reduced loss); True skips the step: DeepSpeed does its
    bookkeeping but no parameter or optimizer state changes. norm=False: the step is not
    logged, so the ZeRO-0 gradient norm (which DeepSpeed does not report) is not computed. poison=True turns the
    first micro-batch loss into NaN (fault injection). Under pipeline parallelism the step
    runs inside DeepSpeed: non-finite gradients are skipped by DeepSpeed's own overflow check.

    timer: adds this step's forward (engine(...) calls), backward (engine.backward), optimizer
    (engine.step) and, where measurable, comm seconds, summed over the micro batches. Pipeline
    engines run the step as one call (train_batch): only the step count is added.
    """
    timer = timer or StepTimes(cuda=False)
    timer.step()
    micro_batches = batches_to_device(micro_batches, engine.device)
    if is_pipeline(engine):
        loss = engine.train_batch(iter(micro_batches))
        return [loss.detach()], engine.get_global_grad_norm(), False
    time_gradient_reduction(engine, timer)
    losses, local_norm, skip = [], None, False
    last = len(micro_batches) - 1
    for i, (x, y) in enumerate(micro_batches):
        with timer.phase("forward"):
            loss = engine(x, y)[1]  # the logits (when returned) are not kept through backward
        if poison and i == 0:
            loss = loss * float("nan")
        losses.append(loss.detach())
        if i == last and judge is not None:
            judge.start(losses)
        with timer.phase("backward"):
            engine.backward(loss)
        if i == last and judge is not None:
            skip = judge.verdict()
        if i == last and norm and not skip and engine.zero_optimization_stage() == 0 and tp == 1:
            # ZeRO-0 reports no norm; its gradients are whole and already averaged here.
            local_norm = _local_grad_norm(engine.module)
        with timer.phase("optimizer"):
            if i == last and skip:
                with skipped_optimizer_step(engine):
                    engine.step()
            else:
                engine.step()
    reported = None if skip else engine.get_global_grad_norm()
    return losses, reported if reported is not None else local_norm, skip


@torch.no_grad()
def eval_losses(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    micro_batches = batches_to_device(micro_batches, engine.device)
    if is_pipeline(engine):
        loss = engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches))
        return [loss.float().item()]
    engine.eval()
    try:
        return [engine(x, y)[1].float().item() for x, y in micro_batches]
    finally:
        engine.train()
