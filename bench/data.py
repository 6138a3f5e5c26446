"""Data: the loader's share of step time, and the throughput of data_pipeline.prepare against
the raw HF tokenizer on the same text.

1. Loader share: data_time_s / step_time_s from raygpt's metrics.jsonl (the gpt-tiny bf16
   runs of bench.stack_overhead when present, else a short run of its own); and
   DistributedLoader.next_step timed directly, without prefetch (the full read) and with
   prefetch while the caller "trains" for one bare-loop step.
2. prepare: tokens/s of data_pipeline.prepare (given the bench tokenizer, so no BPE training)
   on the built-in corpus, with Ray already running and cold (prepare starts Ray), against
   tokenizers' own encode_batch of the same documents in batches of 64 on 1 thread
   (TOKENIZERS_PARALLELISM=false, as prepare's tasks run), per core; and against
   encode_batch_fast (the call prepare makes: the same ids without offsets). Per task, per
   core and over sources larger than a task's memory: bench/prepare_scale.py.

    python -m bench.data [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from statistics import mean, median
from typing import Any

from bench import common


def loader_share_from_runs(run_dirs: list[str]) -> list[dict[str, Any]]:
    out = []
    for d in run_dirs:
        rows = common.steady_rows(common.read_jsonl(Path(d) / "metrics.jsonl"))
        shares = [r["data_time_s"] / r["step_time_s"] for r in rows if r["step_time_s"] > 0]
        if shares:
            out.append(
                {
                    "run": Path(d).name,
                    "data_time_s": mean(r["data_time_s"] for r in rows),
                    "step_time_s": mean(r["step_time_s"] for r in rows),
                    "share_mean": mean(shares),
                    "share_max": max(shares),
                }
            )
    return out


def time_loader(data_dir: str, steps: int, compute_s: float, global_batch: int, micro: int):
    """next_step() seconds: cold first call, then without prefetch, then with prefetch while
    sleeping compute_s between calls (the step the loader overlaps with)."""
    from data_pipeline.loader import DistributedLoader, TokenShards

    res: dict[str, Any] = {}
    for prefetch in (False, True):
        loader = DistributedLoader(
            TokenShards(data_dir, "train"),
            global_batch=global_batch,
            micro_batch=micro,
            dp_rank=0,
            dp_size=1,
            seed=1337,
            prefetch=prefetch,
        )
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            loader.next_step()
            dt = time.perf_counter() - t0
            if i == 0:
                res.setdefault("first_call_s", dt)
            else:
                times.append(dt)
            if prefetch:
                time.sleep(compute_s)
        loader.close()
        res["prefetch" if prefetch else "no_prefetch"] = {
            "mean_s": mean(times),
            "median_s": median(times),
            "max_s": max(times),
        }
    return res


def corpus_texts(data_overrides: list[str]) -> list[str]:
    from data_pipeline.sources import iter_documents

    cfg = common.load_cfg(data_overrides).data
    return [d.text for d in iter_documents(cfg)]


def raw_tokenizer(
    tokenizer_file: str, texts: list[str], batch: int = 64, *, fast: bool = False
) -> dict[str, float]:
    """tokens/s of Tokenizer.encode_batch (fast: encode_batch_fast, the same ids without
    character offsets, which prepare uses) over `texts` in batches, on this thread."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    encode(texts[:8], add_special_tokens=False)  # warm-up
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), batch):
        for enc in encode(texts[i : i + batch], add_special_tokens=False):
            tokens += len(enc.ids) + 1  # + EOS, as prepare appends
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": dt, "tokens_per_sec": tokens / dt}


def time_prepare(overrides: list[str], out: Path, *, ray_running: bool) -> dict[str, float]:
    """Wall seconds of prepare() into a fresh out dir (the bench tokenizer: no BPE training)."""
    import ray

    from data_pipeline.prepare import prepare

    cfg = common.load_cfg([*overrides, f"data.out_dir={out}"]).data
    shutil.rmtree(out, ignore_errors=True)
    if ray_running:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        t0 = time.perf_counter()
        m = prepare(cfg)
        dt = time.perf_counter() - t0
    finally:
        if ray_running:
            ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)
    tokens = sum(s.num_tokens + s.dropped_tokens for s in m.splits.values())
    return {
        "tokens": tokens,
        "seconds": dt,
        "tokens_per_sec": tokens / dt,
        "tasks": int(m.stats.get("num_tasks", 1)),
    }


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    common.header("data: loader share and prepare throughput")
    result: dict[str, Any] = {}
    data_dir = common.bench_data(256, quick=args.quick)

    # 1. loader share of step time
    run_dirs = []
    prior = common.BENCH_DIR / "stack_overhead.json"
    if args.reuse and prior.is_file():
        so = json.loads(prior.read_text())
        run_dirs = [v["run_dir"] for k, v in so.get("raygpt", {}).items() if k.startswith("bf16")]
    if not run_dirs:
        _, d = common.run_raygpt(
            common.train_overrides(
                256,
                run_name="data-share" + ("-quick" if args.quick else ""),
                steps=args.steps,
                workers=2,
                cpus_per_worker=1,
                micro_batch=8,
                global_batch=16,
                precision="bf16",
                quick=args.quick,
            )
        )
        run_dirs = [str(d)]
    shares = loader_share_from_runs(run_dirs)
    step_s = median(s["step_time_s"] for s in shares) if shares else 1.0
    direct = time_loader(data_dir, args.loader_steps, min(step_s, 0.2), 16, 8)
    result["loader"] = {"from_metrics": shares, "direct": direct, "step_time_s": step_s}
    rows = [
        [f"metrics.jsonl {s['run']}", s["data_time_s"] * 1e3, s["step_time_s"], s["share_mean"]]
        for s in shares
    ]
    rows = [[r[0], r[1], r[2], common.pct(r[3])] for r in rows]
    for key, label in (
        ("no_prefetch", "next_step, no prefetch"),
        ("prefetch", "next_step, prefetch"),
    ):
        d = direct[key]
        rows.append([label, d["mean_s"] * 1e3, step_s, common.pct(d["mean_s"] / step_s)])
    rows.append(
        ["next_step, first call (cold shard read)", direct["first_call_s"] * 1e3, step_s, "-"]
    )
    common.print_table(
        "loader time per step (global batch 16 x 256 tokens; rank 0 of the run)",
        ["measured", "loader ms/step", "step s", "share of step"],
        rows,
        caption="metrics rows: the steady 80% of each run. Target: loader <= 1% of step time.",
    )

    # 2. prepare vs raw tokenizer
    tok_file = str(Path(data_dir) / "tokenizer.json")
    overrides = [*common.data_overrides(256, args.quick), f"data.tokenizer={tok_file}"]
    texts = corpus_texts(overrides)
    chars = sum(len(t) for t in texts)
    print(f"raw tokenizer: {len(texts)} documents, {chars / 1e6:.1f} M chars ...", flush=True)
    raw = raw_tokenizer(tok_file, texts)
    raw_fast = raw_tokenizer(tok_file, texts, fast=True)
    del texts
    out = common.DATA_DIR / "prepare-bench"
    print("prepare with Ray running ...", flush=True)
    warm = time_prepare(overrides, out, ray_running=True)
    print("prepare starting its own Ray ...", flush=True)
    cold = time_prepare(overrides, out, ray_running=False)
    cores = min(2, warm["tasks"])
    per_core = {k: v["tokens_per_sec"] / cores for k, v in (("warm", warm), ("cold", cold))}
    result["prepare"] = {
        "raw": raw,
        "raw_fast": raw_fast,
        "warm": warm,
        "cold": cold,
        "cores": cores,
        "ratio_per_core_warm": common.ratio(per_core["warm"], raw["tokens_per_sec"]),
        "ratio_per_core_cold": common.ratio(per_core["cold"], raw["tokens_per_sec"]),
        "ratio_per_core_warm_vs_fast": common.ratio(per_core["warm"], raw_fast["tokens_per_sec"]),
    }
    common.print_table(
        f"tokenization throughput: {raw['tokens']:,} tokens ({chars / 1e6:.1f} M chars)",
        ["path", "seconds", "tokens/s", "cores", "tokens/s per core", "vs raw per core"],
        [
            ["raw encode_batch(64), 1 thread", raw["seconds"], raw["tokens_per_sec"], 1,
             raw["tokens_per_sec"], "1.000"],
            ["raw encode_batch_fast(64), 1 thread", raw_fast["seconds"],
             raw_fast["tokens_per_sec"], 1, raw_fast["tokens_per_sec"],
             f"{raw_fast['tokens_per_sec'] / raw['tokens_per_sec']:.3f}"],
            ["prepare, Ray already running", warm["seconds"], warm["tokens_per_sec"], cores,
             per_core["warm"], f"{result['prepare']['ratio_per_core_warm']:.3f}"],
            ["prepare, cold (starts Ray)", cold["seconds"], cold["tokens_per_sec"], cores,
             per_core["cold"], f"{result['prepare']['ratio_per_core_cold']:.3f}"],
        ],
        caption=f"prepare ran {warm['tasks']} Ray tasks on {cores} cores; it encodes with "
        "encode_batch_fast (same ids, no offsets): against that raw path, Ray running, "
        f"{result['prepare']['ratio_per_core_warm_vs_fast']:.3f} per core. "
        "Target: prepare >= 0.9 x raw tokenizer (encode_batch) throughput per core.",
    )  # fmt: skip
    common.print_command("bench.data", argv)
    result["command"] = common.command("bench.data", argv)
    common.write_result("data", result)
    return result


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.data")
    p.add_argument("--quick", action="store_true", help="150 documents, a few steps (smoke)")
    p.add_argument("--steps", type=int, default=None, help="raygpt steps (default 20)")
    p.add_argument("--loader-steps", type=int, default=None, help="timed next_step calls")
    p.add_argument(
        "--reuse", action="store_true", help="metrics of the runs in runs/bench/stack_overhead.json"
    )
    args = p.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 20)
    args.loader_steps = args.loader_steps or (10 if args.quick else 50)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.cli(run, parse, argv)


if __name__ == "__main__":
    main()
