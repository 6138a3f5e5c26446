"""A bare single-process PyTorch training loop of models.gpt.GPT, nanoGPT style: the yardstick
raygpt's stack (Ray + DeepSpeed + loader + logging) is measured against.

No framework: plain torch.optim.AdamW, gradient accumulation, clipping, and random batches
from the same prepared Parquet shards (TokenShards) or from a numpy array of rows.

Precisions (say which one a figure is):
  fp32            everything in fp32.
  bf16-autocast   nanoGPT's way: fp32 weights and optimizer, torch.autocast("cpu", bf16).
  bf16-weights    DeepSpeed's bf16 done by hand: weights, activations and gradients in bf16,
                  an fp32 master copy updated by AdamW and copied back each step.

    python -m bench.bare_loop [--quick] [--precision bf16-autocast] [--threads 2] [--steps 40]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Union

import numpy as np
import torch

from models.gpt import GPT, GPTConfig

PRECISIONS = ("fp32", "bf16-autocast", "bf16-weights")


@dataclass
class BareResult:
    precision: str
    threads: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    warmup_steps: int
    timed_steps: int
    tokens_per_sec: float  # over the timed steps only (after warm-up)
    step_time_s: float
    data_time_s: float  # mean batch-fetch time per timed step
    flops_per_token: float
    median_tokens_per_sec: float = float("nan")  # from the median timed step (robust to noise)
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # every timed step, seconds


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _batch_source(data: Union[str, np.ndarray]):
    """get(ids) -> int rows (len(ids), seq_len + 1), and the number of samples."""
    if isinstance(data, np.ndarray):
        rows = data
        return (lambda ids: rows[ids]), len(rows), rows.shape[1] - 1
    from data_pipeline.loader import TokenShards

    shards = TokenShards(str(data), "train")
    return shards.get_batch, len(shards), shards.seq_len


def run_bare(
    model_cfg: GPTConfig,
    data: Union[str, np.ndarray],
    *,
    micro_batch: int = 8,
    grad_accum: int = 2,
    steps: int = 40,
    warmup: int = 8,
    precision: str = "bf16-autocast",
    threads: int = 2,
    lr: float = 6e-4,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    seed: int = 1337,
) -> BareResult:
    """Trains `warmup + steps` steps of GPT(model_cfg); times only the last `steps`.

    data: a prepared dataset directory (its train split is read through TokenShards) or an
    int array of rows (N, seq_len + 1).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} must be one of {PRECISIONS}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps ({steps}) must be >= 1 and warmup ({warmup}) >= 0")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    get_rows, num_samples, seq_len = _batch_source(data)

    model = GPT(model_cfg)
    model.train()
    master: list[torch.Tensor] = []
    if precision == "bf16-weights":
        model.to(torch.bfloat16)
        params = [p for p in model.parameters() if p.requires_grad]
        master = [p.detach().float().clone().requires_grad_(True) for p in params]
        groups = _param_groups(model, weight_decay)
        by_id = {id(p): m for p, m in zip(params, master)}
        groups = [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in groups]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = _param_groups(model, weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if precision == "bf16-autocast"
        else contextlib.nullcontext
    )

    losses: list[float] = []
    step_times: list[float] = []
    data_s = 0.0
    t0 = time.perf_counter()
    try:
        for step in range(warmup + steps):
            if step == warmup:
                t0, data_s = time.perf_counter(), 0.0
            td = ts = time.perf_counter()
            ids = rng.integers(0, num_samples, size=micro_batch * grad_accum)
            rows = torch.from_numpy(np.asarray(get_rows(ids), dtype=np.int64))
            rows = rows.view(grad_accum, micro_batch, seq_len + 1)
            data_s += time.perf_counter() - td
            loss_sum = 0.0
            for micro in rows:
                x, y = micro[:, :-1].contiguous(), micro[:, 1:].contiguous()
                with autocast():
                    _, loss = model(x, y)
                (loss / grad_accum).backward()
                loss_sum += loss.item()
            if master:
                for p, m in zip(params, master):
                    m.grad = p.grad.float()
                    p.grad = None
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(master or params, grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if master:
                with torch.no_grad():
                    for p, m in zip(params, master):
                        p.copy_(m)
            losses.append(loss_sum / grad_accum)
            if step >= warmup:
                step_times.append(time.perf_counter() - ts)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)

    tokens_per_step = micro_batch * grad_accum * seq_len
    tokens = steps * tokens_per_step
    return BareResult(
        precision=precision,
        threads=threads,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        seq_len=seq_len,
        warmup_steps=warmup,
        timed_steps=steps,
        tokens_per_sec=tokens / elapsed,
        step_time_s=elapsed / steps,
        data_time_s=data_s / steps,
        flops_per_token=model.flops_per_token(seq_len),
        median_tokens_per_sec=tokens_per_step / float(np.median(step_times)),
        losses=losses,
        step_times=step_times,
    )


def main(argv: list[str] | None = None) -> dict:
    from bench import common

    p = argparse.ArgumentParser(
        prog="python -m bench.bare_loop", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="a few steps (smoke)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16-autocast")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 32; quick 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 8; quick 2)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=8)
    args = p.parse_args(argv)
    steps = args.steps or (4 if args.quick else 32)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 8)

    common.header("bare PyTorch loop")
    data_dir = common.bench_data(args.seq_len, quick=args.quick)
    model_cfg = common.model_config(
        common.model_overrides(args.d_model, args.n_layer, args.n_head), args.seq_len
    )
    r = run_bare(
        model_cfg,
        data_dir,
        micro_batch=args.micro_batch,
        grad_accum=args.grad_accum,
        steps=steps,
        warmup=warmup,
        precision=args.precision,
        threads=args.threads,
    )
    peak = common.measure_peak("fp32" if r.precision == "fp32" else "bf16", args.threads)
    common.print_table(
        f"bare loop: d_model {args.d_model} x {args.n_layer} layers, seq {r.seq_len}, "
        f"batch {r.micro_batch} x {r.grad_accum}, {r.threads} threads",
        ["precision", "tokens/s", "step s", "data s/step", "MFU", "loss first->last"],
        [
            [
                r.precision,
                r.tokens_per_sec,
                r.step_time_s,
                r.data_time_s,
                common.pct(common.mfu(r.tokens_per_sec, r.flops_per_token, peak)),
                f"{r.losses[0]:.3f} -> {r.losses[-1]:.3f}",
            ]
        ],
        caption=f"timed {r.timed_steps} steps after {r.warmup_steps} warm-up; "
        f"peak {peak / 1e9:.0f} GFLOP/s ({args.threads} threads)",
    )
    common.print_command("bench.bare_loop", argv if argv is not None else _argv())
    out = asdict(r)
    out["finite"] = all(math.isfinite(x) for x in r.losses)
    return out


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
