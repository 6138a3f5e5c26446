"""Stack overhead: raygpt's tokens/s (Ray Train + DeepSpeed + loader + logging, through
cluster.launch.run_training) against the bare single-process loop of bench/bare_loop.py with
the same model, global batch, micro batch, sequence length and precision, in the same run.

  raygpt 1 worker  = 1 process x 2 torch threads (cluster.cpus_per_worker=2)
  raygpt 2 workers = 2 processes x 1 thread (data parallel, gloo all-reduce)
  bare             = 1 process x 2 threads, micro batch x grad_accum = the same global batch
  --cores 1        : bare 1 thread, raygpt 1 worker x 1 CPU (Ray's own processes get the other core)

Steady state: raygpt's figure comes from metrics.jsonl rows after the first 20% of steps
(log_interval 1: one row per step); the bare loop times only the steps after the same number
of warm-up steps. "mean" = tokens / seconds over those steps; "median" = the median step,
which a neighbour's burst on a shared machine moves less.

bf16 is not one thing: raygpt's bf16 is DeepSpeed bf16 (bf16 weights, activations and grads,
an fp32 master copy in the optimizer); the bare loop runs both nanoGPT's autocast (fp32
weights) and a hand-written DeepSpeed-style bf16 ("bf16-weights"). Ratios are against each.

    python -m bench.stack_overhead [--quick] [--steps 40] [--precisions bf16,fp32]
        [--raygpt-overrides parallel=ddp optim.fused=true]
        [--variants 'parallel=zero2;parallel=ddp;parallel=ddp optim.fused=true'] [--cores 1]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
from typing import Any

from bench import common
from bench.bare_loop import run_bare

BARE_FOR = {"bf16": ("bf16-autocast", "bf16-weights"), "fp32": ("fp32",)}
LABEL = {
    "bf16": "DeepSpeed bf16",
    "fp32": "fp32",
    "bf16-autocast": "bf16 autocast",
    "bf16-weights": "bf16 weights+master",
}


def raygpt_layouts(workers: list[int], total_cpus: int = 2) -> list[tuple[int, float]]:
    """(num_workers, cpus_per_worker) pairs that use all `total_cpus` cores."""
    return [(w, total_cpus / w) for w in workers]


def parse_variants(text: str) -> list[list[str]]:
    """'a=1 b=2;c=3' -> [["a=1", "b=2"], ["c=3"]]; empty text -> one variant without
    overrides."""
    variants = [v.split() for v in text.split(";") if v.strip()]
    return variants or [[]]


def variant_tag(overrides: list[str]) -> str:
    return ",".join(overrides)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    common.header("stack overhead: raygpt vs bare PyTorch loop")
    seq = args.seq_len
    data_dir = common.bench_data(seq, quick=args.quick)
    model_cfg = common.model_config(["model=gpt-tiny"], seq)
    warmup = max(1, math.ceil(0.2 * args.steps))
    grad_accum_bare = args.global_batch // args.micro_batch
    result: dict[str, Any] = {"steps": args.steps, "warmup": warmup, "bare": {}, "raygpt": {}}
    rows = []
    for prec in args.precisions:
        bare: dict[str, Any] = {}
        for mode in BARE_FOR[prec]:
            print(f"bare loop {mode}: {args.steps} steps ...", flush=True)
            r = run_bare(
                model_cfg,
                data_dir,
                micro_batch=args.micro_batch,
                grad_accum=grad_accum_bare,
                steps=args.steps - warmup,
                warmup=warmup,
                precision=mode,
                threads=args.cores,
            )
            bare[mode] = {
                "tokens_per_sec": r.tokens_per_sec,
                "median_tokens_per_sec": r.median_tokens_per_sec,
                "step_time_s": r.step_time_s,
                "data_time_s": r.data_time_s,
            }
            result["bare"][mode] = bare[mode]
            rows.append(
                [
                    f"bare 1p x {args.cores}t, {args.micro_batch}x{grad_accum_bare}",
                    LABEL[mode],
                    r.tokens_per_sec,
                    r.median_tokens_per_sec,
                    None,
                    None,
                    None,
                ]
            )
        for (workers, cpus), (v, variant) in itertools.product(
            raygpt_layouts(args.workers, args.cores), enumerate(args.variants)
        ):
            tag = variant_tag(variant)
            name = f"overhead-{prec}-w{workers}" + (f"-v{v}" if variant else "")
            name += "-quick" if args.quick else ""
            print(
                f"raygpt {prec} {workers} worker(s) x {cpus:g} CPU"
                + (f" [{tag}]" if tag else "")
                + f": {args.steps} steps ..."
            )
            overrides = common.train_overrides(
                seq,
                run_name=name,
                steps=args.steps,
                workers=workers,
                cpus_per_worker=cpus,
                micro_batch=args.micro_batch,
                global_batch=args.global_batch,
                precision=prec,
                parallel=args.parallel,
                log_interval=args.log_interval,
                quick=args.quick,
            )
            overrides += [*args.raygpt_overrides, *variant]
            _, run_dir = common.run_raygpt(overrides)
            steady = common.steady_tokens_per_sec(common.read_jsonl(run_dir / "metrics.jsonl"))
            key = f"{prec}-w{workers}" + (f"[{tag}]" if tag else "")
            ratios = {
                mode: {
                    "mean": common.ratio(steady["tokens_per_sec"], b["tokens_per_sec"]),
                    "median": common.ratio(
                        steady["median_tokens_per_sec"], b["median_tokens_per_sec"]
                    ),
                }
                for mode, b in bare.items()
            }
            result["raygpt"][key] = {
                **steady,
                "run_dir": str(run_dir),
                "overrides": [*args.raygpt_overrides, *variant],
                "load_average": os.getloadavg()[0],
                "vs_bare": ratios,
            }
            accum = args.global_batch // (args.micro_batch * workers)
            for i, (mode, rt) in enumerate(ratios.items()):
                rows.append(
                    [
                        f"raygpt {workers}p x {int(cpus)}t, {args.micro_batch}x{accum}"
                        + (f", v{v}" if tag else "")
                        if i == 0
                        else "",
                        LABEL[prec] if i == 0 else "",
                        steady["tokens_per_sec"] if i == 0 else None,
                        steady["median_tokens_per_sec"] if i == 0 else None,
                        rt["mean"],
                        rt["median"],
                        LABEL[mode],
                    ]
                )
    common.print_table(
        f"stack overhead: gpt-tiny, seq {seq}, global batch {args.global_batch}, "
        f"{args.parallel}, log_interval {args.log_interval}"
        + (f", raygpt overrides {' '.join(args.raygpt_overrides)}" if args.raygpt_overrides else ""),
        ["run (procs x threads, micro x accum)", "precision", "tok/s mean", "tok/s median",
         "ratio mean", "ratio median", "ratio vs bare"],
        rows,
        caption=f"{args.steps} steps each; the first {warmup} are warm-up and not counted. "
        "DeepSpeed bf16 = bf16 weights/activations/grads + fp32 master in the optimizer; "
        "bf16 autocast = nanoGPT's (fp32 weights); bf16 weights+master = DeepSpeed's scheme "
        "by hand. Target: raygpt >= 0.97 x bare for bf16."
        + "".join(f" v{v}: {variant_tag(x)}." for v, x in enumerate(args.variants) if x),
    )  # fmt: skip
    common.print_command("bench.stack_overhead", argv)
    result["command"] = common.command("bench.stack_overhead", argv)
    common.write_result("stack_overhead", result)
    return result


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.stack_overhead")
    p.add_argument("--quick", action="store_true", help="6 steps, bf16 only (smoke)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 40)")
    p.add_argument("--precisions", default=None, help="comma list of bf16,fp32")
    p.add_argument("--workers", default="1,2", help="comma list of raygpt worker counts")
    p.add_argument(
        "--cores",
        type=int,
        default=2,
        help="cores the training uses: the bare loop's threads, split among raygpt's workers. "
        "1 on this 2-core machine leaves Ray's own processes a core of their own",
    )
    p.add_argument("--parallel", default="zero2", help="raygpt parallel= group")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--log-interval", type=int, default=1)
    p.add_argument(
        "--raygpt-overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra overrides of every raygpt run, e.g. parallel=ddp optim.fused=true",
    )
    p.add_argument(
        "--variants",
        default="",
        help="';'-separated override sets, each a raygpt run of its own against the same bare "
        "figures, e.g. 'parallel=zero2;parallel=ddp;parallel=ddp optim.fused=true'",
    )
    args = p.parse_args(argv)
    args.variants = parse_variants(args.variants)
    args.steps = args.steps or (6 if args.quick else 40)
    args.precisions = (args.precisions or ("bf16" if args.quick else "bf16,fp32")).split(",")
    args.workers = [int(w) for w in args.workers.split(",")]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.cli(run, parse, argv)


if __name__ == "__main__":
    main()
