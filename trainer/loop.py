"""The per-worker training loop (Ray Train's train_loop_per_worker)."""

from __future__ import annotations

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
from models.gpt import GPT, estimate_flops_per_token, estimate_num_params
from trainer import checkpoint
from trainer.config import RootConfig
from trainer.engine import build_engine, eval_losses, is_pipeline, set_lr, train_step
from trainer.logger import RunLogger
from trainer.metrics import Throughput, memory_stats
from trainer.schedule import lr_at


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mean_across_ranks(values: list[float]) -> float:
    """Mean of `values` over every rank (each rank may hold a different number)."""
    t = torch.tensor([sum(values), float(len(values))], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return (t[0] / t[1]).item()


def evaluate(engine, loader: DistributedLoader) -> float:
    """Mean loss over the same leading validation samples every time."""
    loader.load_state_dict({**loader.state_dict(), "consumed_samples": 0})
    return mean_across_ranks(eval_losses(engine, loader.next_step()))


def train_worker(config: dict[str, Any]) -> None:
    """Entry point on every Ray worker. `config` = {"cfg": RootConfig, "data_dir", "peak_flops"}."""
    import ray.train

    cfg: RootConfig = config["cfg"]
    t, m = cfg.trainer, cfg.model
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cluster.threads_per_worker)
    seed_everything(t.seed)

    layout = cfg.layout
    dp_rank = layout.dp_rank(rank)  # TP/PP peers read the same batch
    model = GPT(m)  # same seed on every rank -> identical initial weights
    if m.init_from:  # fine-tuning; on resume the checkpoint overwrites these weights
        from trainer.init_from import load_hf_weights

        load_hf_weights(model, m.init_from)
    engine = build_engine(
        model,
        cfg.parallel,
        cfg.precision,
        cfg.optim,
        layout=layout,
        micro_batch=t.micro_batch_size,
        grad_accum=cfg.grad_accum,
    )

    state: dict[str, Any] = {"step": 0, "consumed_samples": 0, "wandb_id": None}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = checkpoint.load(engine, Path(d), rank)
        if rank == 0:
            print(f"resumed from {ckpt.path} at step {state['step']}")
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
    run_t0, tokens_this_run = time.perf_counter(), 0
    val_loss: Optional[float] = None
    last_metrics: dict[str, Any] = {}
    try:
        for step in range(start_step + 1, last_step + 1):
            lr = lr_at(step, cfg.optim, t.max_steps)
            set_lr(engine, lr)
            t_data = time.perf_counter()
            micro_batches = train_loader.next_step()
            data_s = time.perf_counter() - t_data
            losses, grad_norm = train_step(engine, micro_batches, tp=layout.tp)
            meter.step()
            tokens_this_run += t.global_batch_size * seq_len

            if step % cfg.logging.log_interval == 0 or step == last_step:
                loss_mean = mean_across_ranks([x.float().item() for x in losses])
                last_metrics = {
                    "loss": loss_mean,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    **meter.lap(),
                    "data_time_s": data_s,
                    "consumed_samples": train_loader.consumed_samples,
                    "tokens": train_loader.consumed_samples * seq_len,
                    **memory_stats(),
                }
                if logger:
                    logger.log(step, last_metrics)

            is_last = step == last_step
            if (t.eval_interval and step % t.eval_interval == 0) or is_last:
                val_loss = evaluate(engine, val_loader)
                if logger:
                    logger.log_eval(step, val_loss)

            if (t.checkpoint_interval and step % t.checkpoint_interval == 0) or is_last:
                trainer_state = {
                    "step": step,
                    "consumed_samples": train_loader.consumed_samples,
                    "loader": train_loader.state_dict(),
                    "wandb_id": wandb_id,
                    "run_name": cfg.run.name,
                    "config": cfg.to_dict(),
                }
                local = checkpoint.save_local(engine, rank, trainer_state)
                checkpoint.report({"step": step, "loss": last_metrics.get("loss")}, local, step)

        summary = {
            "run_name": cfg.run.name,
            "final_step": last_step,
            "max_steps": t.max_steps,
            "finished": last_step == t.max_steps,
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
            "wandb_id": wandb_id,
        }
        summary["mfu"] = summary["tokens_per_sec"] * flops_per_token / meter.peak
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
