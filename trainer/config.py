"""Config schemas and validation.

Hydra composes conf/ once, on the driver (data_pipeline/compose.py). `load_config` turns the
result into frozen, keyword-only dataclasses (one per group; each owned by the component that
uses it) and validates every value and every cross-group rule before Ray or DeepSpeed start.
Every failure is a `ConfigError` whose message is one line naming the values and the rule.

A leaf: the dataclasses hold the defaults (conf/ files state what a choice changes), and the
rules are pure (no torch, no worker or driver code, no file or environment reads). What needs
files, the environment or the machine is trainer/driver/preflight.py's check_inputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cluster.config import ClusterConfig
from data_pipeline import compose, storage
from data_pipeline.compose import CONF_DIR, one_line, plain_name_error
from data_pipeline.config import DataConfig
from data_pipeline.storage import StorageConfig
from models.config import GPTConfig, tristate
from trainer.layout import Layout, check_model_fits, check_sequence_fits, make_layout


class ConfigError(ValueError):
    """A bad config value or combination; str() is one line fit for the user."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # floor of the schedule, as a fraction of lr
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # torch.optim.AdamW(fused=True): one fused kernel per parameter group instead of a loop
    # of element-wise ops (CPU and CUDA); DeepSpeed gets it as the client optimizer.
    # true | false | "auto": on CUDA (at gpt2-124m the unfused step took 40-46 ms of 88-98),
    # off on the CPU (as before: the same numbers as the reference loop).
    fused: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "fused", tristate("fused", self.fused))
        if self.name != "adamw":
            raise ValueError(f"name ('{self.name}') must be 'adamw'")
        if not self.lr > 0:
            raise ValueError(f"lr ({self.lr}) must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be >= 0")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(
                f"schedule ('{self.schedule}') must be one of 'cosine', 'linear', 'constant'"
            )
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay ({self.weight_decay}) must be >= 0")
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(self, k) < 1:
                raise ValueError(f"{k} ({getattr(self, k)}) must be in [0, 1)")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip ({self.grad_clip}) must be >= 0 (0 disables)")

    def fused_on(self, device_type: str) -> bool:
        """Whether AdamW runs fused on this accelerator ("cuda" | "cpu")."""
        return device_type == "cuda" if self.fused == "auto" else self.fused


# ParallelConfig's "auto" (None) ZeRO settings by accelerator: on CUDA DeepSpeed's own defaults
# (tuned for NVLink/InfiniBand nodes: 5e8-element buckets, the gradient reduction overlapped
# with backward on its own stream, ZeRO-3 parameters under 1e5 elements - biases, norms - kept
# whole instead of gathered at every use, 5e7-element prefetch); on the CPU (gloo, no streams)
# what raygpt always ran. Not yet measured on a GPU: bench/README.md, "GPU defaults".
ZERO_BY_DEVICE: dict[str, dict] = {
    "cuda": dict(
        overlap_comm=True,
        reduce_bucket_size=500_000_000,
        allgather_bucket_size=500_000_000,
        param_persistence_threshold=100_000,
        prefetch_bucket_size=50_000_000,
    ),
    "cpu": dict(
        overlap_comm=False,
        reduce_bucket_size=50_000_000,
        allgather_bucket_size=50_000_000,
        param_persistence_threshold=0,
        prefetch_bucket_size=50_000_000,
    ),
}


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    name: str = "zero2"
    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    offload_params: bool = False  # ZeRO-Infinity style parameter offload (stage 3 only)
    # Where offloaded state goes: "cpu" memory, or "nvme" files under nvme_path (ZeRO-Infinity,
    # stage 3; needs DeepSpeed's async_io op, i.e. libaio-dev). nvme lets a model whose Adam
    # state exceeds host memory train, at disk speed.
    offload_device: str = "cpu"
    nvme_path: str = "/tmp/raygpt-offload"
    # ZeRO-3 optimizer steps this many parameters at a time; with offload, one sub-group's fp32
    # weights, gradients and Adam moments (16 bytes/param) are in host memory at once.
    sub_group_size: int = 1_000_000_000
    # ZeRO-1/2/3 communication; "auto" / None: by accelerator (ZERO_BY_DEVICE above).
    overlap_comm: str = "auto"  # true | false | "auto"
    reduce_bucket_size: Optional[int] = None  # elements
    allgather_bucket_size: Optional[int] = None  # elements
    # ZeRO-3: parameters of at most this many elements stay whole on every rank
    # (stage3_param_persistence_threshold), and the next modules' parameters are gathered
    # ahead in buckets of this many elements (stage3_prefetch_bucket_size).
    param_persistence_threshold: Optional[int] = None
    prefetch_bucket_size: Optional[int] = None
    # ZeRO-3 only: build the model already partitioned (deepspeed.zero.Init), for models one
    # worker cannot hold. The weights equal a whole build's; DeepSpeed's gradient reduction
    # order differs slightly (fp32 losses drift ~1e-5 relative over 10 steps of gpt-tiny).
    partitioned_init: bool = False
    # Model parallelism; data-parallel size = cluster.num_workers / (tensor x pipeline).
    # DeepSpeed AutoTP, ZeRO 0-2; with pipeline_parallel (3-D) raygpt's own tensor-parallel blocks
    tensor_parallel: int = 1
    pipeline_parallel: int = 1  # DeepSpeed PipelineModule, ZeRO 0-1
    pipeline_partition: str = (
        "parameters"  # DeepSpeed partition_method: parameters|uniform|type:Block
    )
    # Pipeline activation checkpointing every N layers; 0 -> 1 if model.activation_checkpointing.
    pipeline_checkpoint_interval: int = 0
    # Ulysses sequence parallelism: each sample's sequence cut into N slices on N ranks, heads
    # exchanged around attention (trainer/worker/parallel.py apply_sp); ZeRO 0-3, no TP/PP.
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "overlap_comm", tristate("overlap_comm", self.overlap_comm))
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage ({self.zero_stage}) must be 0, 1, 2 or 3")
        if self.partitioned_init and self.zero_stage != 3:
            raise ValueError(
                f"partitioned_init needs zero_stage 3 (got zero_stage {self.zero_stage})"
            )
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ValueError(
                f"tensor_parallel ({self.tensor_parallel}) and pipeline_parallel "
                f"({self.pipeline_parallel}) must be >= 1"
            )
        if self.pipeline_parallel > 1 and self.zero_stage > 1:
            raise ValueError(
                f"pipeline_parallel ({self.pipeline_parallel}) with zero_stage "
                f"{self.zero_stage}: DeepSpeed pipelines support ZeRO stage 0 or 1 only"
            )
        if self.tensor_parallel > 1 and self.zero_stage == 3:
            raise ValueError(
                f"tensor_parallel ({self.tensor_parallel}) with zero_stage 3: AutoTP trains "
                "with ZeRO stage 0, 1 or 2"
            )
        if self.sequence_parallel < 1:
            raise ValueError(f"sequence_parallel ({self.sequence_parallel}) must be >= 1")
        if self.sequence_parallel > 1 and self.pipeline_parallel > 1:
            raise ValueError(
                f"sequence_parallel ({self.sequence_parallel}) with pipeline_parallel "
                f"({self.pipeline_parallel}) is not supported: DeepSpeed's pipeline engine "
                "sends whole-sequence activations between stages"
            )
        if self.sequence_parallel > 1 and self.tensor_parallel > 1:
            raise ValueError(
                f"sequence_parallel ({self.sequence_parallel}) with tensor_parallel "
                f"({self.tensor_parallel}) is not supported: combine sequence parallelism "
                "with data parallelism (ZeRO 0-3)"
            )
        if self.tensor_parallel > 1 and self.pipeline_parallel > 1 and self.zero_stage != 1:
            raise ValueError(
                f"tensor_parallel ({self.tensor_parallel}) with pipeline_parallel "
                f"({self.pipeline_parallel}) (3-D) needs zero_stage 1 (got {self.zero_stage}): "
                "DeepSpeed's pipeline engine clips tensor-parallel gradients right only with ZeRO-1"
            )
        if self.pipeline_parallel > 1 and (self.offload_optimizer or self.offload_params):
            raise ValueError("offload with pipeline_parallel is not supported by DeepSpeed")
        if self.pipeline_checkpoint_interval < 0:
            raise ValueError(
                f"pipeline_checkpoint_interval ({self.pipeline_checkpoint_interval}) must be >= 0"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"offload_params needs zero_stage 3 (got zero_stage {self.zero_stage})"
            )
        if self.offload_device not in ("cpu", "nvme"):
            raise ValueError(f"offload_device ('{self.offload_device}') must be 'cpu' or 'nvme'")
        if self.offload_device == "nvme" and (
            self.zero_stage != 3 or not (self.offload_optimizer or self.offload_params)
        ):
            raise ValueError(
                "offload_device 'nvme' needs zero_stage 3 and offload_optimizer or "
                f"offload_params (got zero_stage {self.zero_stage}, offload_optimizer "
                f"{self.offload_optimizer}, offload_params {self.offload_params})"
            )
        if self.sub_group_size < 1:
            raise ValueError(f"sub_group_size ({self.sub_group_size}) must be >= 1")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (got zero_stage 0)")
        for k in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ValueError(f"{k} ({getattr(self, k)}) must be >= 1 (or null: by device)")
        if self.param_persistence_threshold is not None and self.param_persistence_threshold < 0:
            raise ValueError(
                f"param_persistence_threshold ({self.param_persistence_threshold}) must be >= 0 "
                "(or null: by device)"
            )

    def on(self, device_type: str) -> ParallelConfig:
        """This config with its "auto" / None ZeRO settings those of `device_type`
        (ZERO_BY_DEVICE)."""
        auto = ZERO_BY_DEVICE["cuda" if device_type == "cuda" else "cpu"]
        given = {k: getattr(self, k) for k in auto}
        return dataclasses.replace(
            self, **{k: auto[k] if v in (None, "auto") else v for k, v in given.items()}
        )


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    # "auto": bf16 where the workers' hardware has it natively, fp32 elsewhere; resolved by the
    # driver for the workers (trainer/precision.py). bf16 / fp16 / fp32: as written.
    name: str = "auto"
    bf16: bool = False
    fp16: bool = False
    initial_scale_power: int = 16  # fp16 dynamic loss scale starts at 2**this
    # On CUDA only (the CPU runs as before): fp32 matmuls in TF32 (torch's "high" float32
    # matmul precision), and bf16 at ZeRO-1/2 accumulates micro-batch gradients in fp32
    # (DeepSpeed's data_types.grad_accum_dtype; ZeRO-0 and 3 do not take it).
    tf32: bool = True
    fp32_grad_accum: bool = True

    def __post_init__(self) -> None:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true: choose one (precision=bf16 or fp16)")
        if self.auto and (self.bf16 or self.fp16):
            raise ValueError(
                f"name 'auto' with bf16={self.bf16}, fp16={self.fp16}: auto chooses them; name "
                "the precision instead (precision=bf16, fp16 or fp32)"
            )

    @property
    def auto(self) -> bool:
        """Not resolved yet: the workers' hardware decides (trainer/precision.py)."""
        return self.name == "auto"

    @property
    def dtype_name(self) -> str:
        if self.auto:
            return "auto"
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    name: str = "wandb"
    mode: str = "offline"  # offline | online | disabled
    project: str = "raygpt"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    log_interval: int = 10  # steps between metrics.jsonl / W&B / console lines

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"mode ('{self.mode}') must be one of 'offline', 'online', 'disabled'")
        if self.log_interval < 1:
            raise ValueError(f"log_interval ({self.log_interval}) must be >= 1")


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """The loss-spike and NaN guard (trainer/worker/guard.py applies it)."""

    name: str = "default"
    enabled: bool = True
    spike_factor: float = 3.0  # a loss above this x running mean is a spike; 0 disables
    warmup_steps: int = 20  # accepted steps before spikes are judged (losses fall fast early)
    ema_beta: float = 0.95  # running mean of accepted losses
    max_consecutive: int = 3  # bad steps in a row before on_repeated
    on_repeated: str = "rollback"  # rollback | stop

    def __post_init__(self) -> None:
        if self.spike_factor != 0 and self.spike_factor <= 1:
            raise ValueError(f"spike_factor ({self.spike_factor}) must be > 1 (or 0 to disable)")
        if not 0 < self.ema_beta < 1:
            raise ValueError(f"ema_beta ({self.ema_beta}) must be in (0, 1)")
        if self.max_consecutive < 1:
            raise ValueError(f"max_consecutive ({self.max_consecutive}) must be >= 1")
        if self.on_repeated not in ("rollback", "stop"):
            raise ValueError(f"on_repeated ('{self.on_repeated}') must be 'rollback' or 'stop'")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    max_steps: int = 300
    micro_batch_size: int = 8
    global_batch_size: int = 16  # = micro_batch_size x grad_accum x data-parallel size
    grad_accum: Optional[int] = None  # None -> derived from the other two
    eval_interval: int = 100  # 0 disables periodic eval (a final eval still runs)
    eval_batches: int = 4  # micro batches per rank per eval (>= 1: the final eval always runs)
    checkpoint_interval: int = 100  # 0 -> only the final checkpoint
    # Also checkpoint when this many minutes passed since the last one (preemptible clusters).
    checkpoint_every_minutes: Optional[float] = None
    keep_last: int = 2  # Ray keeps the newest K checkpoints ...
    # ... and every M-th checkpoint_interval checkpoint (step % (M x interval) == 0) is kept
    # for good under run_dir/kept/ (hard links: no extra bytes). 0: keep only the last K.
    keep_every: int = 0
    # SIGTERM to the driver (preemption notice, `ray job stop`): checkpoint at the next step
    # boundary, then exit 143. False: stop without that checkpoint.
    checkpoint_on_sigterm: bool = True
    seed: int = 1337
    sample_tokens: int = 120  # generated at the end of training; 0 disables
    # None -> the first tokens of the first validation document (data_pipeline.prompt).
    sample_prompt: Optional[str] = None
    peak_flops: Optional[float] = None  # per worker, FLOP/s; None -> detect/measure
    # End this invocation after this step, checkpointing it (the LR schedule still follows
    # max_steps): for time-limited allocations. Run the same command again to continue.
    stop_at_step: Optional[int] = None
    # Fault injection for tests and drills: these steps' first micro-batch loss becomes NaN.
    inject_nan_at_steps: list[int] = field(default_factory=list)
    # Audit trail: run_dir/samples.jsonl gets the global sample ids of every step (rank 0).
    log_sample_ids: bool = False
    # torch.profiler trace of these steps into run_dir/profile/ (e.g. [5,6]).
    profile_steps: list[int] = field(default_factory=list)
    # torch.compile (inductor) of every transformer block, applied from outside the model
    # before DeepSpeed wraps it (trainer/worker/parallel.py apply_compile); needs a C++ compiler
    # on CPU. true | false | "auto": on CUDA with data parallelism at ZeRO 0-2, off elsewhere
    # (true there is refused: TP/PP/ZeRO-3 put hooks inside the blocks).
    compile: str = "auto"
    # CPU bf16: each nn.Linear with >= 1024 features computes its weight gradient from a
    # contiguous transposed copy (trainer/worker/kernels.py): oneDNN runs the transposed product at
    # about half rate. Not with TP/PP/ZeRO-3 or on GPUs.
    contiguous_weight_grad: bool = False
    # The loss computed this many tokens at a time (models/loss.py): never the whole (micro
    # batch x seq x vocab) fp32 logits. 0: one F.cross_entropy over the whole logits.
    loss_chunk_tokens: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "compile", tristate("compile", self.compile))
        for k in ("max_steps", "micro_batch_size", "global_batch_size", "keep_last"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} ({getattr(self, k)}) must be >= 1")
        if self.eval_batches < 1:  # 0 would build an empty validation loader in every worker
            raise ValueError(
                f"eval_batches ({self.eval_batches}) must be >= 1: the final eval always runs "
                "(eval_interval=0 turns off only the periodic ones)"
            )
        for k in ("eval_interval", "checkpoint_interval", "sample_tokens", "loss_chunk_tokens"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} ({getattr(self, k)}) must be >= 0")
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.max_steps:
            raise ValueError(
                f"stop_at_step ({self.stop_at_step}) must be in [1, max_steps ({self.max_steps})]"
            )
        if self.grad_accum is not None and self.grad_accum < 1:
            raise ValueError(f"grad_accum ({self.grad_accum}) must be >= 1")
        if self.checkpoint_every_minutes is not None and not self.checkpoint_every_minutes > 0:
            raise ValueError(
                f"checkpoint_every_minutes ({self.checkpoint_every_minutes}) must be > 0 or null"
            )
        if self.keep_every < 0:
            raise ValueError(f"keep_every ({self.keep_every}) must be >= 0")
        if self.keep_every and not self.checkpoint_interval:
            raise ValueError(
                f"keep_every ({self.keep_every}) counts checkpoint_interval checkpoints, "
                "so checkpoint_interval must be > 0"
            )
        for k in ("inject_nan_at_steps", "profile_steps"):
            bad = [s for s in getattr(self, k) if not 1 <= s <= self.max_steps]
            if bad:
                raise ValueError(f"{k} {bad} must be steps in [1, max_steps ({self.max_steps})]")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    root: str = "runs"  # run directories live under here (Ray Train storage_path)
    name: Optional[str] = None  # None -> "<model>-<timestamp>"; the same name resumes
    group: Optional[str] = None  # W&B group; multirun sets it to the sweep

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("root must not be empty")
        for key, role in (("name", "the run directory run.root/<name>"), ("group", "W&B group")):
            value = getattr(self, key)
            if value is not None and (msg := plain_name_error(key, value, role)):
                raise ValueError(msg)


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """Multirun (`python -m trainer.train -m ...`): trainer/driver/sweep/."""

    # The sweep's name: its directory run.root/<name> (job list, statuses, summary), its jobs'
    # run names <name>-<n> and their W&B group. None -> "sweep-<run.name>" when run.name is
    # given (jobs <run.name>-<n>), else "sweep-<fingerprint of the sweep's overrides>".
    name: Optional[str] = None
    max_parallel: int = 2  # jobs training at once on the Ray cluster, each its own run

    def __post_init__(self) -> None:
        if self.max_parallel < 1:
            raise ValueError(f"max_parallel ({self.max_parallel}) must be >= 1")
        if self.name is not None and (
            msg := plain_name_error("name", self.name, "a directory and run-name prefix")
        ):
            raise ValueError(msg)


@dataclass(frozen=True, kw_only=True)
class RootConfig:
    model: GPTConfig
    data: DataConfig
    optim: OptimConfig
    parallel: ParallelConfig
    precision: PrecisionConfig
    cluster: ClusterConfig
    logging: LoggingConfig
    guard: GuardConfig
    trainer: TrainerConfig
    run: RunConfig
    sweep: SweepConfig
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def layout(self) -> Layout:
        p = self.parallel
        return make_layout(
            self.cluster.num_workers, p.tensor_parallel, p.pipeline_parallel, p.sequence_parallel
        )

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def grad_accum(self) -> int:
        t = self.trainer
        return t.global_batch_size // (t.micro_batch_size * self.dp_size)

    @property
    def run_uri(self) -> str:
        """The run directory: a local/shared path or an object-store URI (s3://, gs://)."""
        assert self.run.name, "run.name is resolved by load_config"
        return storage.join(self.run.root, self.run.name)

    @property
    def run_dir(self) -> Path:
        """The run directory as a local path (tests and local tools; never for s3:// runs)."""
        assert not storage.is_remote(self.run_uri), f"{self.run_uri} is not a local path"
        return Path(self.run_uri)

    def to_dict(self) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(self), resolve=True)


GROUPS: dict[str, type] = {
    "model": GPTConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "parallel": ParallelConfig,
    "precision": PrecisionConfig,
    "cluster": ClusterConfig,
    "logging": LoggingConfig,
    "guard": GuardConfig,
    "trainer": TrainerConfig,
    "run": RunConfig,
    "sweep": SweepConfig,
    "storage": StorageConfig,
}


compose.register_schema(GROUPS)  # Hydra code that composes by itself (the sweeps) finds it


def check_group_options(overrides: list[str]) -> None:
    """Every config-group choice names a plain file of its conf/ directory (ConfigError)."""
    compose.check_group_options(list(overrides), conf_dir=CONF_DIR, error=ConfigError)


# Group choices a user may expect that raygpt does not build: why, and what to use instead.
NOT_BUILT = {
    ("precision", "fp8"): "FP8 training is not built (it needs FP8 tensor cores, Hopper or "
    "newer, and FP8 linear layers raygpt does not have): use precision=bf16 on GPUs, fp32 on "
    "CPUs",
}


def check_not_built(overrides: list[str]) -> None:
    """A choice of NOT_BUILT is one line saying so, rather than a missing conf/ file."""
    for line in overrides:
        key, _, value = line.partition("=")
        why = NOT_BUILT.get((key.lstrip("+~"), value.strip()))
        if why:
            raise ConfigError(f"{key.lstrip('+~')}={value.strip()}: {why}")


def compose_config(overrides: list[str]) -> DictConfig:
    """Composes conf/config.yaml with Hydra overrides, every group typed (ConfigError)."""
    check_not_built(overrides)
    return compose.compose(list(overrides), GROUPS, conf_dir=CONF_DIR, error=ConfigError)


def to_root_config(cfg: DictConfig, *, default_name: Optional[str] = None) -> RootConfig:
    """Instantiates and validates every group of a composed config."""
    groups = {}
    for group, cls in GROUPS.items():
        if group not in cfg:
            raise ConfigError(f"config has no '{group}' section")
        try:
            raw = OmegaConf.to_container(cfg[group], resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{group}: {one_line(e)}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{group}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        try:
            groups[group] = cls(**raw)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{group}: {e}") from None
    # Workers run in other directories: local paths are made absolute here, on the driver.
    run = groups["run"]
    groups["run"] = dataclasses.replace(
        run,
        root=_absolute(run.root),
        name=run.name or default_name or f"{groups['model'].name}-{_timestamp()}",
    )
    model = groups["model"]
    if model.init_from:
        groups["model"] = dataclasses.replace(model, init_from=_absolute(model.init_from))
    data = groups["data"]
    groups["data"] = dataclasses.replace(
        data,
        out_dir=_absolute(data.out_dir),
        tokenizer=_absolute(data.tokenizer) if data.tokenizer else None,
    )
    if groups["data"].mixture:
        groups["data"] = dataclasses.replace(groups["data"], mixture=_absolute_mixture(data))
    root = RootConfig(**groups)
    validate(root)
    return root


def load_config(overrides: list[str], *, default_name: Optional[str] = None) -> RootConfig:
    return to_root_config(compose_config(overrides), default_name=default_name)


def _absolute_mixture(data: DataConfig):
    """data.mixture with every source's dir made absolute (object-store URIs stay)."""
    m = data.mixture
    sources = {n: dataclasses.replace(s, dir=_absolute(s.dir)) for n, s in m.sources.items()}
    return dataclasses.replace(m, sources=sources)


def _absolute(path: str) -> str:
    """An absolute local path; object-store URIs (s3://, gs://) stay as they are."""
    return storage.absolute(path)


def _timestamp() -> str:
    import datetime

    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def validate(cfg: RootConfig) -> None:
    """Cross-group rules. Per-group rules live in each dataclass's __post_init__. Pure: the
    checks that read files, the environment or the machine (the tokenizer's vocab,
    model.init_from, WANDB_API_KEY, the local cluster's CPUs and GPUs) are
    trainer/driver/preflight.py's check_inputs."""
    m, d, t = cfg.model, cfg.data, cfg.trainer
    if d.seq_len > m.block_size:
        raise ConfigError(
            f"data.seq_len ({d.seq_len}) exceeds model.block_size ({m.block_size}): "
            "sequences must fit the model context"
        )
    try:
        layout = cfg.layout
        check_model_fits(m, layout)
        check_sequence_fits(d.seq_len, layout)
    except ValueError as e:
        raise ConfigError(f"parallel layout: {e}") from None
    if cfg.parallel.pipeline_parallel > 1 and cfg.parallel.zero_stage == 0 and cfg.precision.bf16:
        raise ConfigError(
            "pipeline_parallel with bf16 needs zero_stage 1 (DeepSpeed's bf16 pipeline "
            "checkpoints cannot be loaded at ZeRO stage 0)"
        )
    par = cfg.parallel
    # Both act on the model's modules before DeepSpeed wraps them; TP, PP and ZeRO-3 put their
    # own hooks and module replacements inside the blocks.
    dp_only = [
        name
        for name, on in (
            ("trainer.compile", t.compile is True),
            ("trainer.contiguous_weight_grad", t.contiguous_weight_grad),
        )
        if on
    ]
    model_parallel = par.tensor_parallel > 1 or par.pipeline_parallel > 1
    if dp_only and (model_parallel or par.sequence_parallel > 1 or par.zero_stage == 3):
        raise ConfigError(
            f"{dp_only[0]} with tensor_parallel {par.tensor_parallel}, pipeline_parallel "
            f"{par.pipeline_parallel}, sequence_parallel {par.sequence_parallel}, zero_stage "
            f"{par.zero_stage}: it is supported with data parallelism at ZeRO stage 0-2 only "
            "(TP/PP/SP/ZeRO-3 hooks inside the blocks)"
        )
    if cfg.cluster.gpus_per_worker > 1:
        raise ConfigError(
            f"cluster.gpus_per_worker ({cfg.cluster.gpus_per_worker:g}) > 1: DeepSpeed drives one "
            "GPU per process (cuda:LOCAL_RANK), so the others would idle; give each GPU its own "
            "worker: cluster.gpus_per_worker=1 and cluster.num_workers = the GPUs in all"
        )
    if t.contiguous_weight_grad and cfg.cluster.use_gpu:
        raise ConfigError(
            f"trainer.contiguous_weight_grad with cluster.gpus_per_worker "
            f"{cfg.cluster.gpus_per_worker}: it is a CPU kernel "
            "option (oneDNN's bf16 matmul); GPUs take transposed operands at full rate"
        )
    dp = cfg.dp_size
    per_step = t.micro_batch_size * dp
    if t.grad_accum is not None:
        if t.global_batch_size != t.micro_batch_size * t.grad_accum * dp:
            raise ConfigError(
                f"trainer.global_batch_size ({t.global_batch_size}) != micro_batch_size "
                f"({t.micro_batch_size}) x grad_accum ({t.grad_accum}) x data-parallel size "
                f"({dp}) = {t.micro_batch_size * t.grad_accum * dp}"
            )
    elif t.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp}) = {per_step}"
        )


def check_vocab_fits(model: GPTConfig, vocab: int, source: str) -> None:
    """The rule "model.vocab_size >= the tokenizer's vocab", for every place the vocab is
    learned (a given tokenizer, a prepared manifest, a mixture's datasets, the BPE size):
    `source` says where `vocab` comes from."""
    if model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's vocab "
            f"({vocab}, from {source})"
        )


def check_eval_fits(cfg: RootConfig, val_samples: int, where: str) -> None:
    """An eval reads trainer.eval_batches micro batches per data-parallel rank, the same
    leading validation samples every time. More than the validation split holds would read
    samples twice and weight them twice in the reported val loss, which no setting means:
    refused (the I/O that finds val_samples is the caller's: preflight, prepare)."""
    t, dp = cfg.trainer, cfg.dp_size
    per_eval = t.eval_batches * t.micro_batch_size * dp
    if per_eval <= val_samples:
        return
    fits = val_samples // (t.micro_batch_size * dp)
    remedy = (
        f"set trainer.eval_batches <= {fits}"
        if fits
        else "give more validation data (data.val_fraction, data.val_sources)"
    )
    raise ConfigError(
        f"trainer.eval_batches ({t.eval_batches}) x micro_batch_size ({t.micro_batch_size}) x "
        f"data-parallel size ({dp}) = {per_eval} validation samples per eval, but the "
        f"validation split of {where} holds {val_samples}: an eval would read samples twice; "
        f"{remedy}"
    )


def config_warnings(cfg: RootConfig) -> list[str]:
    """Settings that take effect differently than written but that a user can mean, most
    often a short trial (trainer.max_steps=2) of a config made for a long run: at most one
    line, printed by the driver. Refusing them would block exactly those trials.

    - optim.warmup_steps > max_steps: the learning rate never reaches optim.lr (it ends at
      max_steps/warmup_steps of it); the schedule still runs as written.
    - trainer.eval_interval / checkpoint_interval > max_steps: only the final eval / the
      final checkpoint (what 0 means), which always run.
    - logging.log_interval > max_steps: only the last step is logged (it always is).
    - trainer.keep_every: no checkpoint_interval x keep_every step within the run, so no
      checkpoint is kept for good.
    """
    t, n = cfg.trainer, cfg.trainer.max_steps
    parts = []
    warmup = cfg.optim.warmup_steps
    if warmup > n:
        parts.append(
            f"optim.warmup_steps ({warmup}) is longer than the run: the learning rate ends at "
            f"{n}/{warmup} of optim.lr"
        )
    late = [
        f"{key} ({value})"
        for key, value in (
            ("trainer.eval_interval", t.eval_interval),
            ("trainer.checkpoint_interval", t.checkpoint_interval),
            ("logging.log_interval", cfg.logging.log_interval),
        )
        if value > n
    ]
    if late:
        parts.append(
            f"{', '.join(late)} > max_steps: only the final eval/checkpoint/log line of each"
        )
    if t.keep_every and t.checkpoint_interval * t.keep_every > n:
        parts.append(
            f"trainer.keep_every ({t.keep_every}) x checkpoint_interval "
            f"({t.checkpoint_interval}) > max_steps: no checkpoint is kept for good"
        )
    if not parts:
        return []
    return [f"warning: trainer.max_steps is {n}: " + "; ".join(parts)]
