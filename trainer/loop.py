"""The per-worker training loop (Ray Train's train_loop_per_worker)."""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.loader import DistributedLoader, TokenShards
from data_pipeline.manifest import Manifest
from models.gpt import estimate_flops_per_token, estimate_num_params
from trainer import checkpoint, faults
from trainer.config import RootConfig
from trainer.control import CheckpointPolicy, StepControl, comm_device
from trainer.engine import (
    build_engine,
    build_model,
    eval_losses,
    is_pipeline,
    set_lr,
    train_step,
)
from trainer.guard import LossGuard, TooManyBadSteps
from trainer.logger import RunLogger
from trainer.metrics import StepTimes, Throughput, memory_stats, model_state_bytes, peak_rss_mib
from trainer.profiling import StepProfiler
from trainer.schedule import lr_at


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


def evaluate(engine, loader: DistributedLoader) -> float:
    """Mean loss over the same leading validation samples every time."""
    loader.load_state_dict({**loader.state_dict(), "consumed_samples": 0})
    return mean_across_ranks(eval_losses(engine, loader.next_step()))


def quiet_ray_train_logs() -> None:
    """Ray Train logs every report ("Reporting training result ...") at INFO under a logger
    named after its file, which RunConfig's LoggingConfig does not reach; our own lines say
    when a checkpoint is saved."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train version: its logging stays as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(config: dict[str, Any]) -> None:
    """Entry point on every Ray worker. `config` = {"cfg": RootConfig, "data_dir", "peak_flops"}."""
    import ray.train

    cfg: RootConfig = config["cfg"]
    t, m = cfg.trainer, cfg.model
    quiet_ray_train_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cluster.threads_per_worker)
    seed_everything(t.seed)

    layout = cfg.layout
    dp_rank = layout.dp_rank(rank)  # TP/PP peers read the same batch
    sizes = dict(layout=layout, micro_batch=t.micro_batch_size, grad_accum=cfg.grad_accum)
    # Same seed on every rank -> identical initial weights (ZeRO-3: built partitioned).
    model = build_model(m, cfg.parallel, cfg.precision, cfg.optim, seed=t.seed, **sizes)
    engine = build_engine(
        model,
        cfg.parallel,
        cfg.precision,
        cfg.optim,
        compile=t.compile,
        contiguous_weight_grad=t.contiguous_weight_grad,
        **sizes,
    )
    memory = {
        "rank": rank,
        "layout": str(layout),
        **model_state_bytes(engine),
        "rss_after_build_mib": memory_stats()["rss_mib"],
    }

    state: dict[str, Any] = {"step": 0, "consumed_samples": 0, "wandb_id": None}
    newest: Optional[str] = None  # the newest checkpoint of this run (guard rollbacks go there)
    ckpt = ray.train.get_checkpoint()
    # Saved at another data-parallel size: the driver converted it (trainer/universal.py).
    universal = config.get("universal") or {}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            uni = universal.get("dir") if Path(d).name == universal.get("checkpoint") else None
            state = checkpoint.load(engine, Path(d), rank, universal_dir=uni)
        newest = Path(ckpt.path).name
        if rank == 0:
            how = " (universal checkpoint)" if uni else ""
            print(f"resumed from {ckpt.path}{how} at step {state['step']}")
    start_step = int(state["step"])

    data_dir = config["data_dir"]
    seq_len = cfg.data.seq_len
    train_loader = DistributedLoader(
        TokenShards(data_dir, "train"),
        global_batch=t.global_batch_size,
        micro_batch=t.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=cfg.dp_size,
        seed=t.seed,
        consumed_samples=int(state["consumed_samples"]),
    )
    val_shards = TokenShards(data_dir, "val")
    val_loader = DistributedLoader(
        val_shards,
        global_batch=t.micro_batch_size * t.eval_batches * cfg.dp_size,
        micro_batch=t.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=cfg.dp_size,
        seed=t.seed,
        shuffle=False,
    )

    fault = faults.from_env()
    policy = CheckpointPolicy(t)
    control = StepControl(policy, config.get("stop_signal"), rank)
    sample_log = SampleLog(cfg.run_dir, rank, dp_rank) if t.log_sample_ids else None
    guard = LossGuard(cfg.guard)
    if state.get("guard"):
        guard.load_state_dict(state["guard"])
    step_loss: dict[str, Any] = {}

    def judge(losses: list[torch.Tensor]) -> bool:
        """Same verdict on every rank: it sees the loss averaged over all of them."""
        step_loss["mean"] = mean_across_ranks([x.float().item() for x in losses])
        step_loss["reason"] = guard.judge(step_loss["mean"])
        return step_loss["reason"] is not None

    wandb_id = state.get("wandb_id") or uuid.uuid4().hex[:12]
    logger: Optional[RunLogger] = None
    if rank == 0:
        logger = RunLogger(
            cfg.run_dir,
            cfg.logging,
            run_name=cfg.run.name,
            group=cfg.run.group,
            wandb_id=wandb_id,
            config=cfg.to_dict(),
            max_steps=t.max_steps,
            start_step=start_step,
            console_lines=config.get("console_lines", True),
        )
    # From the config: after sharding the module holds only this rank's part.
    flops_per_token = estimate_flops_per_token(m, seq_len)
    meter = Throughput(
        tokens_per_step=t.global_batch_size * seq_len,
        flops_per_token=flops_per_token,
        peak_flops_total=config["peak_flops"] * world,
    )
    last_step = min(t.max_steps, t.stop_at_step or t.max_steps)
    step_times = StepTimes()  # data/forward/backward/comm/optimizer seconds per step
    profiler = StepProfiler(t.profile_steps, cfg.run_dir / "profile", rank, last_step=last_step)
    run_t0, tokens_this_run = time.perf_counter(), 0
    val_loss: Optional[float] = None
    last_metrics: dict[str, Any] = {}
    try:
        poison_left = set(t.inject_nan_at_steps)  # fires once, even if a rollback repeats it
        step = start_step
        while step < last_step:
            step += 1
            lr = lr_at(step, cfg.optim, t.max_steps)
            set_lr(engine, lr)
            step_loss.clear()
            profiler.start(step)
            t_data = time.perf_counter()
            if sample_log:
                sample_log.write(
                    step, train_loader.sample_ids_for_step(train_loader.consumed_samples)
                )
            micro_batches = train_loader.next_step()
            data_s = time.perf_counter() - t_data
            step_times.add("data", data_s)
            faults.maybe_pause(fault, "step", step, rank, cfg.run_dir)
            losses, grad_norm, skipped = train_step(
                engine,
                micro_batches,
                tp=layout.tp,
                judge=judge if guard.cfg.enabled else None,
                poison=step in poison_left,
                timer=step_times,
            )
            poison_left.discard(step)
            meter.step()
            if profiler.active:
                with meter.paused():  # writing the trace is not training time
                    profiler.step(step)
            tokens_this_run += t.global_batch_size * seq_len
            roll_back = False
            if skipped:
                if logger:
                    print(
                        f"[guard] step {step} skipped: {step_loss['reason']} "
                        f"({guard.skipped + 1} skipped so far)"
                    )
                roll_back = guard.reject()
            elif "mean" in step_loss:
                guard.accept(step_loss["mean"])

            if step % cfg.logging.log_interval == 0 or step == last_step:
                loss_mean = step_loss.get("mean")
                if loss_mean is None:
                    loss_mean = mean_across_ranks([x.float().item() for x in losses])
                last_metrics = {
                    "loss": loss_mean,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    **meter.lap(),
                    **step_times.lap(),  # data_time_s, forward_time_s, ... per step
                    "consumed_samples": train_loader.consumed_samples,
                    "tokens": train_loader.consumed_samples * seq_len,
                    "skipped_steps": guard.skipped,
                    **memory_stats(),
                }
                if logger:
                    logger.log(step, last_metrics)
            if roll_back:
                step = recover(
                    engine, guard, cfg, rank, step, train_loader, logger, universal, newest
                )
                continue

            stop, time_due = control.decide()
            is_last = step == last_step or stop
            if (t.eval_interval and step % t.eval_interval == 0) or is_last:
                with meter.paused():
                    val_loss = evaluate(engine, val_loader)
                if logger:
                    logger.log_eval(step, val_loss)

            why = policy.reason(step, last=step == last_step, time_due=time_due, stop=stop)
            if why == "stop" and not t.checkpoint_on_sigterm:
                why = None
            if why:
                trainer_state = {
                    "step": step,
                    "consumed_samples": train_loader.consumed_samples,
                    "loader": train_loader.state_dict(),
                    "wandb_id": wandb_id,
                    "guard": guard.state_dict(),
                    "run_name": cfg.run.name,
                    "config": cfg.to_dict(),
                }
                with meter.paused():
                    local = checkpoint.save_local(engine, rank, trainer_state)
                    faults.maybe_pause(fault, "save", step, rank, cfg.run_dir)
                    checkpoint.report(
                        {"step": step, "loss": last_metrics.get("loss")},
                        local,
                        step,
                        before_upload=(
                            lambda s=step: faults.maybe_pause(fault, "upload", s, rank, cfg.run_dir)
                        )
                        if fault
                        else None,
                    )
                    policy.saved()
                    newest = f"checkpoint_{step:08d}"
                    if policy.keep_for_good(step):
                        if dist.is_initialized():
                            dist.barrier()  # every rank's files are in the run directory
                        if rank == 0:
                            checkpoint.keep_for_good(cfg.run_dir, f"checkpoint_{step:08d}")
                if logger and why in ("time", "stop"):
                    print(f"[checkpoint] step {step} saved ({why})", flush=True)
            if stop:
                last_step = step
                if logger:
                    print(f"stopping at step {step}: {control.stop_reason}", flush=True)
                break
        profiler.close()  # a stop inside the profiled steps still writes their trace

        summary = {
            "run_name": cfg.run.name,
            "final_step": last_step,
            "max_steps": t.max_steps,
            "finished": last_step == t.max_steps,
            "stopped_by": control.stop_reason,
            "final_train_loss": last_metrics.get("loss"),
            "final_val_loss": val_loss,
            "final_val_ppl": float(np.exp(val_loss)) if val_loss is not None else None,
            "uniform_loss": float(np.log(Manifest.load(data_dir).tokenizer.vocab_size)),
            "tokens_per_sec": tokens_this_run / max(time.perf_counter() - run_t0, 1e-9),
            "mfu": None,
            "num_params": estimate_num_params(m),
            "layout": str(layout),
            "num_workers": world,
            "precision": cfg.precision.dtype_name,
            "zero_stage": cfg.parallel.zero_stage,
            "consumed_samples": train_loader.consumed_samples,
            "skipped_steps": guard.skipped,
            "wandb_id": wandb_id,
        }
        summary["mfu"] = summary["tokens_per_sec"] * flops_per_token / meter.peak
        # After training: Adam's moments exist only once the optimizer has stepped.
        write_memory_report(
            cfg.run_dir, {**memory, **model_state_bytes(engine), "peak_rss_mib": peak_rss_mib()}
        )
        sample = None
        if not is_pipeline(engine):  # stages hold parts of the model: no single forward
            sample = generate_sample(engine, data_dir, t.sample_prompt, t.sample_tokens, t.seed)
        summary["sample"] = sample
        if logger:
            logger.finish(summary)
            logger = None
    finally:
        if logger:
            logger.close()


def recover(
    engine,
    guard: LossGuard,
    cfg: RootConfig,
    rank: int,
    step: int,
    loader,
    logger,
    universal: dict[str, str],
    newest: Optional[str],
) -> int:
    """After guard.max_consecutive bad steps: stop, or roll back to the newest checkpoint
    and carry on from the current data position (skipping the offending window)."""
    where = f"{guard.cfg.max_consecutive} bad steps in a row up to step {step}"
    latest = Path(cfg.run_dir) / newest if newest else None
    if guard.cfg.on_repeated == "stop" or latest is None:
        why = "guard.on_repeated=stop" if latest else "no checkpoint to roll back to yet"
        raise TooManyBadSteps(
            f"{where}; stopping ({why}). Lower optim.lr, check the data "
            f"around sample {loader.consumed_samples}, or raise "
            "guard.max_consecutive"
        )
    position = loader.state_dict()
    uni = universal.get("dir") if latest.name == universal.get("checkpoint") else None
    state = checkpoint.load(engine, latest, rank, universal_dir=uni)
    loader.load_state_dict(position)  # continue past the bad window, not through it again
    guard.consecutive = 0
    if logger:
        print(
            f"[guard] {where}: rolled back to step {state['step']} ({latest.name}); "
            f"skipping samples {state['consumed_samples']}..{position['consumed_samples']}"
        )
    return int(state["step"])


class SampleLog:
    """run_dir/samples/rank_<r>.jsonl: the global sample ids this rank trained on, per step
    (trainer.log_sample_ids): an audit that every sample is seen exactly once, also across
    interruptions, restarts and a new data-parallel size (the last record of a step counts)."""

    def __init__(self, run_dir: Path, rank: int, dp_rank: int):
        self.dp_rank = dp_rank
        path = Path(run_dir) / "samples" / f"rank_{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a")  # noqa: SIM115 - kept open for the run, line-buffered below

    def write(self, step: int, ids) -> None:
        row = {"step": step, "dp_rank": self.dp_rank, "ids": [int(i) for i in ids]}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()


def write_memory_report(run_dir: Path, report: dict[str, Any]) -> None:
    """run_dir/memory/rank_<r>.json: what each worker held (bench/memory.py reads these)."""
    out = Path(run_dir) / "memory"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank_{report['rank']}.json").write_text(json.dumps(report, indent=1) + "\n")


def generate_sample(engine, data_dir: str, prompt: str, n_tokens: int, seed: int) -> Optional[str]:
    """A sample from the trained model. Every rank runs it in lockstep (ZeRO-3 gathers)."""
    if n_tokens <= 0:
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(data_dir) / Manifest.load(data_dir).tokenizer.file))
    ids = tok.encode(prompt).ids or [0]
    torch.manual_seed(seed)
    engine.eval()
    out = engine.module.generate(
        torch.tensor([ids], dtype=torch.long), max_new_tokens=n_tokens, temperature=0.8, top_k=50
    )
    engine.train()
    return tok.decode(out[0].tolist())


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
