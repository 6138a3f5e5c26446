"""How long a context fits per rank: activation memory of one training step (forward and
backward, activation checkpointing on) of the gpt-tiny and llama-1b shapes at sequence
parallelism 1, 2 and 4 (where the heads divide), against sequence length.

    python -m bench.context_length                       # bounded: a few lengths per layout
    python -m bench.context_length --shapes gpt-tiny --sp 1,2 --max-seq 8192
    python -m bench.context_length --budget-gib 24       # the longest length under 24 GiB

Each layout runs in its own gloo process group of SP processes (one thread each), with
raygpt's model and Ulysses hooks (trainer/worker/parallel.py apply_sp), micro batch 1, fp32.
From --start-seq the sequence doubles while a step takes under --max-step-s and --max-seq is
not passed; each step's activation peak is the resident memory sampled every 2 ms during it
above the resident memory before it (freed heap returned first, malloc_trim; the gradient
buffers exist from a warm-up step of 8 tokens), per rank. The
longest measured length is printed, and the longest that fits --budget-gib per rank, model
state (parameters, gradients, Adam: 16 bytes/param) included, from the straight line through
the measured peaks (activation memory is linear in tokens per rank with flash attention).
llama-1b keeps its width, heads and 128k vocabulary with --layers blocks (default 2, 16 in
the real model: the per-layer memory is the same, so the line scales with it). On a loaded
machine the step-time bound stops the search early: say so with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from bench import common  # noqa: F401  (environment)

WORKER = textwrap.dedent(
    """
    import ctypes, json, os, sys, threading, time
    import torch, torch.distributed as dist
    from trainer.config import load_config
    from trainer.layout import make_layout
    from models.gpt import GPT
    from trainer.worker.parallel import apply_sp

    args = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    rank, sp = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    overrides = [f"model={args['shape']}", "model.activation_checkpointing=true",
                 f"model.block_size={args['max_seq']}", *args["overrides"]]
    cfg = load_config(overrides, default_name="ctx").model
    torch.manual_seed(0)
    gpt = GPT(cfg)
    apply_sp(gpt, make_layout(sp, 1, 1, sp=sp), rank)
    gpt.train()
    # a short warm-up step first: the gradient buffers (kept, zeroed in place) are model
    # state, not activations, and are in the memory before every measured step
    warm = torch.randint(0, cfg.vocab_size, (1, 8))
    gpt(warm, warm)[1].backward()
    rows, seq = [], args["start_seq"]
    while seq <= args["max_seq"]:
        t = seq // sp
        idx = torch.randint(0, cfg.vocab_size, (1, t))
        gpt.zero_grad(set_to_none=False)
        libc.malloc_trim(0)
        dist.barrier()
        base, peak, stop = rss(), [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        _, loss = gpt(idx, idx)
        loss.backward()
        dt = time.perf_counter() - t0
        stop.set()
        sampler.join()
        peak_bytes = max(peak[0], rss()) - base
        # every rank's peak, the largest counts; every rank's time, the slowest counts
        t = torch.tensor([float(peak_bytes), dt], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows.append({"seq": seq, "tokens_per_rank": seq // sp, "peak_bytes": t[0].item(),
                     "step_s": t[1].item()})
        if t[1].item() > args["max_step_s"]:
            break
        seq *= 2
    n_params = sum(p.numel() for p in gpt.parameters())
    print("RESULT " + json.dumps({"rows": rows, "n_params": n_params}))
    """
)


def heads(shape: str, overrides: list[str]) -> tuple[int, int]:
    from trainer.config import load_config

    m = load_config([f"model={shape}", *overrides], default_name="ctx").model
    return m.n_head, m.kv_heads


def fit(rows: list[dict]) -> tuple[float, float] | None:
    """(bytes per token per rank, intercept) of the least-squares line through the peaks."""
    if len(rows) < 2:
        return None
    xs = [r["tokens_per_rank"] for r in rows]
    ys = [r["peak_bytes"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="gpt-tiny,llama-1b")
    parser.add_argument("--sp", default="1,2,4")
    parser.add_argument("--layers", type=int, default=2, help="llama-1b blocks (16 real)")
    parser.add_argument("--start-seq", type=int, default=512)
    parser.add_argument("--max-seq", type=int, default=4096)
    parser.add_argument("--max-step-s", type=float, default=60.0)
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(common.ROOT / "tests" / "dist"))
    from single_engine import run_ranks

    gib = 2**30
    results = {}
    print(
        f"{'shape':<10} {'SP':>2} {'seq':>7} {'tokens/rank':>11} {'act. peak MiB/rank':>18} "
        f"{'step s':>7}"
    )
    for shape in args.shapes.split(","):
        overrides = [f"model.n_layer={args.layers}"] if shape == "llama-1b" else []
        n_head, n_kv = heads(shape, overrides)
        for sp in map(int, args.sp.split(",")):
            if n_head % sp or n_kv % sp or args.start_seq % sp:
                print(f"{shape:<10} {sp:>2} skipped: {n_head} heads / {n_kv} kv heads")
                continue
            job = dict(
                shape=shape,
                overrides=overrides,
                start_seq=args.start_seq,
                max_seq=args.max_seq,
                max_step_s=args.max_step_s,
            )
            out = run_ranks(WORKER, json.dumps(job), world=sp, timeout=args.timeout_s)[0]
            results[f"{shape}/sp{sp}"] = out
            for r in out["rows"]:
                print(
                    f"{shape:<10} {sp:>2} {r['seq']:>7} {r['tokens_per_rank']:>11} "
                    f"{r['peak_bytes'] / 2**20:>18.1f} {r['step_s']:>7.1f}"
                )
    print()
    print(f"longest sequence per layout: measured, and under {args.budget_gib:g} GiB per rank")
    for key, out in results.items():
        rows = out["rows"]
        line = fit(rows)
        state = 16 * out["n_params"]  # fp32 parameters, gradients, Adam's two moments
        sp = int(key.rsplit("sp", 1)[1])
        longest = rows[-1]["seq"]
        if line is None or line[0] <= 0:
            projected = "n/a (fewer than 2 points)"
        else:
            per_rank = (args.budget_gib * gib - state - line[1]) / line[0]
            projected = f"{int(per_rank) * sp:,} tokens ({int(per_rank):,} per rank)"
        print(
            f"  {key:<16} measured up to {longest:,} tokens ({longest // sp:,} per rank); "
            f"model state {state / gib:.2f} GiB; fits: {projected}"
        )
    print("command: python -m bench.context_length " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
