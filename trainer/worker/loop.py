"""The per-worker training loop: `Trainer` builds, resumes, steps, evaluates, saves and sums up.

`train()` reads as the sequence of component calls it is; each method owns one part of a
step. State that a checkpoint carries comes from components with state_dict/load_state_dict
(the loader, the guard) plus the step counter (`TrainState`), saved and restored as parts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline import storage
from data_pipeline.loader import DistributedLoader
from data_pipeline.manifest import Manifest
from data_pipeline.mixture import MixtureLoader, build_loaders, close_loaders
from models.gpt import estimate_flops_per_token, estimate_num_params
from trainer.checkpoint.manager import CheckpointManager
from trainer.config import RootConfig
from trainer.startup_trace import mark
from trainer.worker import faults
from trainer.worker.control import StepControl, comm_device
from trainer.worker.ds_patches import ENGINE_PATCHES
from trainer.worker.engine import (
    accelerator_device_type,
    build_engine,
    build_model,
    eval_losses,
    is_pipeline,
    to_device,
    train_step,
)
from trainer.worker.entry import WorkerConfig
from trainer.worker.guard import LossGuard, StepJudge, TooManyBadSteps
from trainer.worker.observability.bpb import missing_note, val_bits_per_byte
from trainer.worker.observability.logger import RunLogger
from trainer.worker.observability.metrics import (
    StepTimes,
    Throughput,
    memory_stats,
    model_state_bytes,
    peak_flops_per_worker,
    peak_rss_mib,
)
from trainer.worker.observability.profiler import StepProfiler
from trainer.worker.observability.run_files import RunFiles
from trainer.worker.parallel import plan_ac, sequence_parallel_off
from trainer.worker.schedule import build_scheduler


def new_wandb_id() -> str:
    return uuid.uuid4().hex[:12]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mean_across_ranks(values: list[float]) -> float:
    """Mean of `values` over every rank (each rank may hold a different number)."""
    t = torch.tensor([sum(values), float(len(values))], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(comm_device())  # NCCL reduces only GPU tensors
        dist.all_reduce(t)
    return (t[0] / t[1]).item()


class TrainState:
    """The step counter and run identity, as a checkpoint part."""

    def __init__(self) -> None:
        self.step = 0
        self.wandb_id = new_wandb_id()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "wandb_id": self.wandb_id}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step = int(d["step"])
        self.wandb_id = d.get("wandb_id") or self.wandb_id


class Trainer:
    def __init__(self, config: WorkerConfig, context: Any):
        self.context = context  # cluster/worker_context.py: Ray Train's, or this process's
        self.rank, self.world = context.rank, context.world_size
        mark(f"worker {self.rank}: up")
        self.cfg: RootConfig = own_precision(config.cfg, self.rank)
        self.config = config
        self.layout = self.cfg.layout
        self.dp_rank = self.layout.dp_rank(self.rank)  # TP/PP peers read the same batch
        self.state = TrainState()
        self.val_loss: Optional[float] = None
        self.val_bpb: Optional[float] = None
        self.last_metrics: dict[str, Any] = {}
        self.rewound: dict[str, int] = {}  # run-file rows set aside at resume (RunFiles.rewind)

    # -- the sequence -------------------------------------------------------------------------
    def train(self) -> None:
        self.build()
        mark("worker: built")
        self.resume()
        self.start_logging()
        mark("worker: logging started")
        try:
            while self.state.step < self.last_step:
                rollback = self.step()
                if rollback:
                    self.rollback()
                    continue
                stop, time_due = self.control.decide(self.state.step)
                last = self.state.step == self.last_step or stop
                if self.eval_due(last):
                    self.evaluate()
                self.save(
                    self.checkpoints.policy.reason(
                        self.state.step,
                        last=self.state.step == self.last_step,
                        time_due=time_due,
                        stop=stop,
                    )
                )
                if stop:
                    self.stop()
                    break
            mark("worker: last step done")
            self.summary()
            mark("worker: summary done")
        finally:
            self.close()

    # -- build and resume ---------------------------------------------------------------------
    def build(self) -> None:
        self.make_engine()
        self.make_loaders()
        self.make_controls()

    def make_engine(self) -> None:
        """The model, wrapped by DeepSpeed once, and its LR schedule."""
        cfg, t = self.cfg, self.cfg.trainer
        torch.set_num_threads(cfg.cluster.threads_per_worker)
        # First: an unknown GPU without trainer.peak_flops fails in seconds, not after a build.
        self.peak = peak_flops_per_worker(
            cfg.precision.dtype_name,
            cfg.cluster.threads_per_worker,
            self.config.peak_flops or t.peak_flops,
            device=torch.device(accelerator_device_type()),
        )
        seed_everything(t.seed)
        sizes = dict(layout=self.layout, micro_batch=t.micro_batch_size, grad_accum=cfg.grad_accum)
        # Same seed on every rank -> identical initial weights (ZeRO-3: built partitioned).
        mark("worker: peak known")
        model = build_model(cfg.model, cfg.parallel, cfg.precision, cfg.optim, seed=t.seed, **sizes)
        ac_blocks, ac_choice = plan_ac(
            cfg.model,
            cfg.parallel,
            cfg.precision,
            self.layout,
            micro_batch=t.micro_batch_size,
            seq_len=cfg.data.seq_len,
            loss_chunk=t.loss_chunk_tokens,
            device_type=accelerator_device_type(),
        )
        if ac_choice and self.rank == 0:
            print(ac_choice, flush=True)
        self.engine = build_engine(
            model,
            cfg.parallel,
            cfg.precision,
            cfg.optim,
            compile=t.compile,
            contiguous_weight_grad=t.contiguous_weight_grad,
            loss_chunk=t.loss_chunk_tokens,
            ac_blocks=ac_blocks,
            **sizes,
        )
        self.scheduler = build_scheduler(self.engine.optimizer, cfg.optim, t.max_steps)
        mark("worker: engine built")
        self.memory = {
            "rank": self.rank,
            "node_id": self.context.node_id(),  # where this rank ran
            "layout": str(self.layout),
            **model_state_bytes(self.engine),
            "rss_after_build_mib": memory_stats(self.engine.device)["rss_mib"],
        }

    def make_loaders(self) -> None:
        """This rank's training loader and the validation loaders."""
        cfg, t = self.cfg, self.cfg.trainer
        loader_args = dict(
            micro_batch=t.micro_batch_size, dp_rank=self.dp_rank, dp_size=cfg.dp_size, seed=t.seed
        )
        if self.layout.sp > 1:  # sequence peers: the same samples, each its slice of them
            loader_args.update(seq_rank=self.layout.sp_rank(self.rank), seq_size=self.layout.sp)
        # A mixture's val loaders are its sources' ({"": ...} for one dataset).
        self.train_loader, self.val_loaders = build_loaders(
            cfg.data,
            self.config.data_dir,
            global_batch=t.global_batch_size,
            val_batch=t.micro_batch_size * t.eval_batches * cfg.dp_size,
            **loader_args,
        )
        # Bits per byte: each val split's bytes per token, from its manifest (None: not recorded)
        self.val_bytes_per_token = {
            name: loader.shards.manifest.splits["val"].bytes_per_token
            for name, loader in self.val_loaders.items()
        }
        for loader in (self.train_loader, *self.val_loaders.values()):
            loader.place_on(self.engine.device)  # CUDA: pinned and copied in the prefetch thread

    def make_controls(self) -> None:
        """The loss guard, the run files, the checkpoint manager and the stop control."""
        cfg, t = self.cfg, self.cfg.trainer
        self.guard = LossGuard(cfg.guard)
        self.judge = StepJudge(self.guard)
        self.fault = faults.from_env()
        self.files = RunFiles(cfg.run_uri, self.rank)
        self.checkpoints = CheckpointManager(
            cfg.run_uri,
            self.rank,
            t,
            ENGINE_PATCHES,
            universal=self.config.universal,
            pause=lambda point, step: faults.maybe_pause(
                self.fault, point, step, self.rank, self.files.local
            ),
        )
        self.control = StepControl(self.checkpoints.policy, self.rank, self.context)
        self.last_step = min(t.max_steps, t.stop_at_step or t.max_steps)
        self.poison_left = set(t.inject_nan_at_steps)  # fires once, even if a rollback repeats it

    def parts(self) -> dict[str, Any]:
        """The checkpointed state parts (each has state_dict / load_state_dict)."""
        return {"train": self.state, "loader": self.train_loader, "guard": self.guard}

    def resume(self) -> None:
        """Loads the run's latest verified checkpoint, if any (trainer/checkpoint/index.py)."""
        found = self.checkpoints.resume(self.engine, self.parts())
        if found is not None and self.rank == 0:
            uri, saved = found
            how = " (universal checkpoint)" if saved["universal"] else ""
            print(f"resumed from {uri}{how} at step {self.state.step}")
        # Rows an earlier invocation logged after that checkpoint are set aside, not repeated.
        self.rewound = self.files.rewind(self.state.step)
        if self.rewound and self.rank == 0:
            aside = ", ".join(f"{n} of {rel}" for rel, n in self.rewound.items())
            print(f"rewound the run files to step {self.state.step}: set aside {aside} rows")

    def start_logging(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        self.logger: Optional[RunLogger] = None
        if self.rank == 0:
            fork_from = None
            if self.state.step and set(self.rewound) & {"metrics.jsonl", "eval.jsonl"}:
                # W&B has those rows too: one clean history in a run forked at the checkpoint.
                fork_from = f"{self.state.wandb_id}?_step={self.state.step}"
                self.state.wandb_id = new_wandb_id()
            self.logger = RunLogger(
                self.files.local,
                cfg.logging,
                run_name=cfg.run.name,
                group=cfg.run.group,
                wandb_id=self.state.wandb_id,
                fork_from=fork_from,
                config=cfg.to_dict(),
                max_steps=t.max_steps,
                start_step=self.state.step,
                console_lines=self.config.console_lines,
            )
            dirs = {name: loader.shards.data_dir for name, loader in self.val_loaders.items()}
            note = missing_note(self.val_bytes_per_token, dirs)
            if note:
                print(note, flush=True)
        self.sample_log = (
            SampleLog(self.files.path(f"samples/rank_{self.rank}.jsonl"), self.dp_rank)
            if t.log_sample_ids
            else None
        )
        # From the config: after sharding the module holds only this rank's part.
        self.flops_per_token = estimate_flops_per_token(cfg.model, cfg.data.seq_len)
        self.meter = Throughput(
            tokens_per_step=t.global_batch_size * cfg.data.seq_len,
            flops_per_token=self.flops_per_token,
            peak_flops_total=self.peak * self.world,
        )
        cuda = self.engine.device.type == "cuda"
        self.step_times = StepTimes(cuda=cuda)
        self.profiler = StepProfiler(
            t.profile_steps,
            self.files.local / "profile",
            self.rank,
            last_step=self.last_step,
            cuda=cuda,
        )
        self.run_t0, self.tokens_this_run = time.perf_counter(), 0
        self.started_at = utc_now()

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> bool:
        """One optimizer step (or a guarded skip); True when the guard wants a rollback."""
        t, step = self.cfg.trainer, self.state.step + 1
        self.state.step = step
        lr = self.scheduler.step(step)
        self.judge.reset()
        self.profiler.start(step)
        t_data = time.perf_counter()
        if self.sample_log:
            consumed = self.train_loader.consumed_samples
            if isinstance(self.train_loader, MixtureLoader):
                sources, ids = self.train_loader.step_samples(consumed)
                self.sample_log.write(step, ids, sources)
            else:
                self.sample_log.write(step, self.train_loader.sample_ids_for_step(consumed))
        micro_batches = self.train_loader.next_step()
        self.step_times.add("data", time.perf_counter() - t_data)
        faults.maybe_pause(self.fault, "step", step, self.rank, self.files.local)
        logged = step % self.cfg.logging.log_interval == 0 or step == self.last_step
        losses, grad_norm, skipped = train_step(
            self.engine,
            micro_batches,
            tp=self.layout.tp,
            judge=self.judge if self.guard.cfg.enabled else None,
            poison=step in self.poison_left,
            timer=self.step_times,
            norm=logged,
        )
        self.poison_left.discard(step)
        self.meter.step()
        if self.profiler.active:
            with self.meter.paused():  # writing the trace is not training time
                self.profiler.step(step)
        self.tokens_this_run += t.global_batch_size * self.cfg.data.seq_len
        if skipped and self.logger:
            print(
                f"[guard] step {step} skipped: {self.judge.reason} "
                f"({self.guard.skipped + 1} skipped so far)"
            )
        rollback = self.judge.settle(skipped)
        if logged:  # the step's only host reads of device values (besides the guard's)
            self.log(step, lr, losses, grad_norm)
        return rollback

    def log(self, step: int, lr: float, losses: list[torch.Tensor], grad_norm: Any) -> None:
        loss = self.judge.loss
        if loss is None:  # guard off: the one reduction happens here, on log steps only
            loss = mean_across_ranks([x.float().item() for x in losses])
        consumed = self.train_loader.consumed_samples
        self.last_metrics = {
            "time": time.time(),  # wall clock: a checkpoint step's stall shows between rows
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            **self.meter.lap(),
            **self.step_times.lap(),  # data_time_s, forward_time_s, ... per step
            "consumed_samples": consumed,
            **(
                self.train_loader.metrics() if isinstance(self.train_loader, MixtureLoader) else {}
            ),  # passes/<source>
            "tokens": consumed * self.cfg.data.seq_len,
            "skipped_steps": self.guard.skipped,
            **memory_stats(self.engine.device),
        }
        if self.logger:
            self.logger.log(step, self.last_metrics)
        self.files.sync(force=False)

    def rollback(self) -> None:
        """After guard.max_consecutive bad steps: stop, or roll back to this run's newest
        checkpoint and carry on from the current data position (skipping the bad window)."""
        g, step = self.guard, self.state.step
        where = f"{g.cfg.max_consecutive} bad steps in a row up to step {step}"
        point = self.checkpoints.rollback_point() if g.cfg.on_repeated != "stop" else None
        if point is None:
            why = "guard.on_repeated=stop" if g.cfg.on_repeated == "stop" else None
            raise TooManyBadSteps(
                f"{where}; stopping ({why or 'no checkpoint to roll back to yet'}). Lower "
                f"optim.lr, check the data around sample {self.train_loader.consumed_samples}, "
                "or raise guard.max_consecutive"
            )
        position, counts = self.train_loader.state_dict(), g.state_dict()
        self.checkpoints.load(point, self.engine, self.parts())
        self.train_loader.load_state_dict(position)  # continue past the bad window
        g.load_state_dict(counts)  # the skipped steps still count
        if self.logger:
            print(
                f"[guard] {where}: rolled back to step {self.state.step} "
                f"({storage.name(point)}); skipping samples up to {position['consumed_samples']}"
            )

    # -- evaluate and save --------------------------------------------------------------------
    def eval_due(self, last: bool) -> bool:
        interval = self.cfg.trainer.eval_interval
        return last or bool(interval and self.state.step % interval == 0)

    def evaluate(self) -> None:
        """Mean loss over the same leading validation samples every time; with a mixture, each
        source's (its own val split) and their mean as val_loss."""
        with self.meter.paused():
            losses = {name: self._val_loss(loader) for name, loader in self.val_loaders.items()}
            self.val_loss = float(np.mean(list(losses.values())))
        self.val_bpb, bpb = val_bits_per_byte(losses, self.val_bytes_per_token)
        if self.logger:
            mixture = bool(self.cfg.data.mixture)
            self.logger.log_eval(
                self.state.step,
                self.val_loss,
                losses if mixture else None,
                val_bpb=self.val_bpb,
                bpb_by_source=bpb if mixture else None,
            )

    def _val_loss(self, loader: DistributedLoader) -> float:
        loader.load_state_dict({**loader.state_dict(), "consumed_samples": 0})
        return mean_across_ranks(eval_losses(self.engine, loader.next_step()))

    def save(self, why: Optional[str]) -> None:
        t, step = self.cfg.trainer, self.state.step
        if why is None or (why == "stop" and not t.checkpoint_on_sigterm):
            return
        extra = {
            "consumed_samples": self.train_loader.consumed_samples,
            "run_name": self.cfg.run.name,
            "config": self.cfg.to_dict(),
        }
        with self.meter.paused():
            self.files.sync()  # the run files reach storage no later than the checkpoint
            self.checkpoints.save(step, self.engine, self.parts(), extra)
        if self.logger and why in ("time", "stop"):
            print(f"[checkpoint] step {step} saved ({why})", flush=True)

    def stop(self) -> None:
        self.last_step = self.state.step
        if self.logger:
            print(f"stopping at step {self.state.step}: {self.control.stop_reason}", flush=True)

    # -- the end ------------------------------------------------------------------------------
    def summary(self) -> None:
        self.profiler.close()  # a stop inside the profiled steps still writes their trace
        cfg, t = self.cfg, self.cfg.trainer
        data_dir = self.config.data_dir
        val = self.val_loss
        wall = max(time.perf_counter() - self.run_t0, 1e-9)
        train_tps = self.tokens_this_run / max(wall - self.meter.paused_total, 1e-9)
        summary = {
            "run_name": cfg.run.name,
            "invocation": self.config.invocation,
            "final_step": self.last_step,
            "max_steps": t.max_steps,
            "finished": self.last_step == t.max_steps,
            "stopped_by": self.control.stop_reason,
            "final_train_loss": self.last_metrics.get("loss"),
            "final_val_loss": val,
            "final_val_ppl": float(np.exp(val)) if val is not None else None,
            "final_val_bpb": self.val_bpb,  # None: the manifest has no byte counts
            "uniform_loss": float(np.log(Manifest.load(data_dir).tokenizer.vocab_size)),
            # training tokens/s leaves eval and checkpoint time out; end-to-end includes it
            "train_tokens_per_sec": train_tps,
            "end_to_end_tokens_per_sec": self.tokens_this_run / wall,
            "mfu": train_tps * self.flops_per_token / self.meter.peak,
            "num_params": estimate_num_params(cfg.model),
            "layout": str(self.layout),
            "num_workers": self.world,
            "precision": cfg.precision.dtype_name,
            "zero_stage": cfg.parallel.zero_stage,
            "consumed_samples": self.train_loader.consumed_samples,
            "skipped_steps": self.guard.skipped,
            "wandb_id": self.state.wandb_id,
            "started_at": self.started_at,  # this invocation, UTC ISO 8601
        }
        # After training: Adam's moments exist only once the optimizer has stepped.
        report = {**self.memory, **model_state_bytes(self.engine), "peak_rss_mib": peak_rss_mib()}
        self.files.path(f"memory/rank_{self.rank}.json").write_text(
            json.dumps(report, indent=1) + "\n"
        )
        mark("worker: summary written")
        sample = None
        if not is_pipeline(self.engine):  # stages hold parts of the model: no single forward
            sample = generate_sample(
                self.engine, data_dir, t.sample_prompt, t.sample_tokens, t.seed
            )
        summary["sample"] = sample
        summary["ended_at"] = utc_now()
        if self.logger:
            self.logger.finish(summary)
            self.logger = None

    def close(self) -> None:
        try:
            if hasattr(self, "checkpoints"):  # every save persisted (and registered) before exit
                self.checkpoints.close()
        finally:  # a failed background write is raised, after the rest is closed
            if getattr(self, "logger", None):
                self.logger.close()
            if hasattr(self, "files"):
                self.files.close()
            if hasattr(self, "val_loaders"):  # read threads end with the run, not the process
                close_loaders(self.train_loader, *self.val_loaders.values())


def own_precision(cfg: RootConfig, rank: int) -> RootConfig:
    """cfg with precision=auto resolved for this worker's device: only for a caller that hands
    a worker an unresolved config (the driver resolves it for all workers: trainer/precision.py)."""
    if not cfg.precision.auto:
        return cfg
    from trainer.precision import choose, probe, with_precision

    return with_precision(cfg, *choose(probe(accelerator_device_type() == "cuda")), echo=rank == 0)


def utc_now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class SampleLog:
    """samples/rank_<r>.jsonl: the global sample ids this rank trained on, per step
    (trainer.log_sample_ids): an audit that every sample is seen exactly once, also across
    interruptions, restarts and a new data-parallel size (the last record of a step counts)."""

    def __init__(self, path: Path, dp_rank: int):
        self.dp_rank = dp_rank
        self._f = open(path, "a")  # noqa: SIM115 - kept open for the run, flushed per row

    def write(self, step: int, ids, sources=None) -> None:
        """sources (a mixture): the source name of each id, as "sources" (ids are per source)."""
        row = {"step": step, "dp_rank": self.dp_rank, "ids": [int(i) for i in ids]}
        if sources is not None:
            row["sources"] = list(sources)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()


def generate_sample(
    engine, data_dir: str, prompt: Optional[str], n_tokens: int, seed: int
) -> Optional[str]:
    """A sample from the trained model. Every rank runs it in lockstep (ZeRO-3 gathers).
    prompt None (trainer.sample_prompt: null): the start of the validation data."""
    if n_tokens <= 0:
        return None
    if prompt is None:
        from data_pipeline.prompt import default_prompt

        prompt = default_prompt(data_dir)
    from tokenizers import Tokenizer

    manifest = Manifest.load(data_dir)
    tmp = Path(tempfile.mkdtemp(prefix="raygpt-tok-"))
    try:
        tok_file = storage.download(
            storage.join(data_dir, manifest.tokenizer.file), tmp / "tok.json"
        )
        tok = Tokenizer.from_file(str(tok_file))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ids = tok.encode(prompt).ids or [0]
    torch.manual_seed(seed)
    engine.eval()
    prompt_ids = to_device(torch.tensor([ids], dtype=torch.long), engine.device)
    with sequence_parallel_off(engine.module) as gpt:  # each rank generates whole sequences
        out = gpt.generate(prompt_ids, max_new_tokens=n_tokens, temperature=0.8, top_k=50)
    engine.train()
    return tok.decode(out[0].tolist())


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
