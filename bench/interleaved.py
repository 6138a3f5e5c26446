"""Interleaved A/B of raygpt's training step against the bare loop's, in one process: robust to
a neighbour's load on a shared machine, where runs measured one after the other are not.

Each variant is a single-process DeepSpeed engine (world size 1, gloo; trainer.worker.engine
build_model/build_engine/train_step with the loss guard's judge, as trainer/worker/loop.py calls them)
or the bare nanoGPT step of bench/bare_loop.py (bf16 autocast, torch.optim.AdamW, clipping,
loss.item() per micro batch). Every round runs one step of every variant on fresh random
batches of the same shape; a busy neighbour only ever adds time, so the figure is the fastest
step of each ("min") and the 25th percentile ("p25"), ratios = bare / variant seconds.
What it leaves out of raygpt: Ray Train, the loader (< 0.1% of a step) and logging (the
metrics rows of bench.stack_overhead put step_time - data - forward - backward - optimizer at
about 1%).

Variants: z<stage>[f][c][g] = ZeRO stage, f: optim.fused, c: trainer.compile,
g: trainer.contiguous_weight_grad (a no-op below d_model 1024: no layer is that wide).

    python -m bench.interleaved [--variants z2,z0,z0f,z0fc] [--rounds 16] [--d-model 256 ...]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from bench import common


def parse_variant(name: str) -> dict[str, Any]:
    """'z0fc' -> {"stage": 0, "fused": True, "compile": True, "contiguous": False}."""
    flags = name[2:]
    if len(name) < 2 or name[0] != "z" or not name[1].isdigit() or set(flags) - set("fcg"):
        raise ValueError(f"variant {name!r} must look like z<stage>[f][c][g], e.g. z2, z0fc")
    return {
        "stage": int(name[1]),
        "fused": "f" in flags,
        "compile": "c" in flags,
        "contiguous": "g" in flags,
    }


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from bench.checkpoint import init_single_process_group

    init_single_process_group()  # world size 1, gloo (as bench.checkpoint)
    import numpy as np
    import torch

    from models.gpt import GPT
    from trainer.config import GuardConfig, OptimConfig, ParallelConfig, PrecisionConfig
    from trainer.layout import Layout
    from trainer.worker.engine import build_engine, build_model, train_step
    from trainer.worker.guard import LossGuard, StepJudge

    common.header("interleaved A/B: raygpt train_step vs bare loop step")
    torch.set_num_threads(args.threads)
    m = common.model_config(
        common.model_overrides(args.d_model, args.n_layer, args.n_head), args.seq_len
    )
    accum = args.global_batch // args.micro_batch
    sizes = dict(layout=Layout(world=1, dp=1, tp=1, pp=1), micro_batch=args.micro_batch,
                 grad_accum=accum)  # fmt: skip
    prec = PrecisionConfig(name="bf16", bf16=True)
    rng = np.random.default_rng(0)

    def batch():
        rows = torch.from_numpy(rng.integers(0, m.vocab_size, (accum, args.micro_batch,
                                                                args.seq_len + 1)))  # fmt: skip
        return [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows]

    steps: dict[str, Any] = {}
    for name in args.variants:
        v = parse_variant(name)
        par = ParallelConfig(name=f"zero{v['stage']}", zero_stage=v["stage"])
        opt = OptimConfig(fused=v["fused"])
        engine = build_engine(
            build_model(m, par, prec, opt, seed=0, **sizes), par, prec, opt,
            compile=v["compile"], contiguous_weight_grad=v["contiguous"], **sizes,
        )  # fmt: skip
        judge = StepJudge(LossGuard(GuardConfig()))  # the guard's per-step look at the loss
        steps[name] = lambda b, e=engine, j=judge: train_step(e, b, tp=1, judge=j, norm=False)

    torch.manual_seed(0)
    bare = GPT(m)
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=OptimConfig().lr, betas=(0.9, 0.95))

    def bare_step(b):
        for x, y in b:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = bare(x, y)
            (loss / len(b)).backward()
            loss.item()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    steps["bare"] = bare_step
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step(batch())
        print(f"{name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {n: [] for n in steps}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, step in steps.items():
            b = batch()
            t0 = time.perf_counter()
            step(b)
            times[name].append(time.perf_counter() - t0)
    tokens = args.global_batch * args.seq_len
    stats = {n: {"min_s": min(t), "p25_s": sorted(t)[len(t) // 4], "steps_s": t}
             for n, t in times.items()}  # fmt: skip
    for s in stats.values():
        s["ratio_min"] = stats["bare"]["min_s"] / s["min_s"]
        s["ratio_p25"] = stats["bare"]["p25_s"] / s["p25_s"]
        s["tokens_per_sec_min"] = tokens / s["min_s"]
    common.print_table(
        f"interleaved A/B: d_model {args.d_model} x {args.n_layer} layers, seq {args.seq_len}, "
        f"batch {args.micro_batch} x {accum}, bf16, {args.threads} threads, "
        f"{args.rounds} rounds",
        ["variant", "min step s", "tok/s (min)", "bare/variant (min)", "p25 step s",
         "bare/variant (p25)"],
        [[n, s["min_s"], s["tokens_per_sec_min"], s["ratio_min"], s["p25_s"], s["ratio_p25"]]
         for n, s in stats.items()],
        caption="z<stage>: DeepSpeed bf16 ZeRO stage; f: optim.fused; c: trainer.compile; "
        "g: trainer.contiguous_weight_grad. "
        f"bare: nanoGPT-style bf16 autocast. Load average during the rounds: "
        f"{min(loads):.2f}..{max(loads):.2f}.",
    )  # fmt: skip
    common.print_command("bench.interleaved", argv)
    result = {"variants": stats, "load_average": loads, "command":
              common.command("bench.interleaved", argv)}  # fmt: skip
    common.write_result("interleaved", result)
    return result


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.interleaved")
    p.add_argument("--quick", action="store_true", help="3 rounds, z2 and z0 (smoke)")
    p.add_argument("--variants", default=None, help="comma list (default z2,z0,z0f,z0fc)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 16)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=8)
    args = p.parse_args(argv)
    default = "z2,z0" if args.quick else "z2,z0,z0f,z0fc"
    args.variants = (args.variants or default).split(",")
    for v in args.variants:
        parse_variant(v)
    args.rounds = args.rounds or (3 if args.quick else 16)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.cli(run, parse, argv)


if __name__ == "__main__":
    main()
