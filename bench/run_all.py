"""Runs every benchmark in turn and prints a final summary table against the targets.

    python -m bench.run_all [--quick]
    python -m bench.run_all --summary-only     # the table of the figures saved last time

mfu and data reuse the gpt-tiny runs of stack_overhead (--reuse). Each benchmark also saves
its figures as runs/bench/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional

from bench import common

NAMES = ("stack_overhead", "interleaved", "mfu", "data", "checkpoint")
TARGETS = {
    "overhead": 0.97,  # raygpt tokens/s >= 0.97 x bare, gpt-tiny bf16
    "mfu": 0.50,  # larger model, of the measured bf16 matmul peak
    "loader": 0.01,  # loader <= 1% of step time
    "prepare": 0.90,  # prepare >= 0.9 x raw tokenizer per core
}


def _row(metric: str, value: Optional[float], target: str, met: Optional[bool], how: str = ""):
    return [metric, value, target, met, how]


def summary_rows(results: dict[str, Any]) -> list[list[Any]]:
    """[metric, value, target, met (None: no target), detail] for each headline figure."""
    rows: list[list[Any]] = []
    so = results.get("stack_overhead")
    if so:
        for key, v in so["raygpt"].items():
            if not key.startswith("bf16"):
                continue
            for mode, r in v["vs_bare"].items():
                value = r["median"] if r["median"] is not None else r["mean"]
                met = None if value is None else value >= TARGETS["overhead"]
                rows.append(
                    _row(
                        f"raygpt/bare tokens/s, gpt-tiny {key} vs {mode}",
                        value,
                        f">= {TARGETS['overhead']}",
                        met,
                        f"median step; mean {r['mean']:.3f}" if r["mean"] is not None else "",
                    )
                )
    inter = results.get("interleaved")
    if inter:
        for name, v in inter["variants"].items():
            if name == "bare":
                continue
            rows.append(
                _row(
                    f"raygpt/bare step, interleaved in one process, gpt-tiny bf16 {name}",
                    v["ratio_min"],
                    f">= {TARGETS['overhead']}",
                    v["ratio_min"] >= TARGETS["overhead"],
                    f"fastest steps; p25 {v['ratio_p25']:.3f}",
                )
            )
    mfu = results.get("mfu")
    if mfu:
        rows.append(
            _row("bf16 matmul peak, 2 threads (GFLOP/s)", mfu["peaks"]["bf16_2t"] / 1e9, "", None)
        )
        rows.append(
            _row("fp32 matmul peak, 2 threads (GFLOP/s)", mfu["peaks"]["fp32_2t"] / 1e9, "", None)
        )
        for name, m in mfu["models"].items():
            target = name == mfu.get("large")
            for who in ("bare", "raygpt"):
                v = m[f"{who}_mfu"]
                rows.append(
                    _row(
                        f"MFU {name} {who}",
                        v,
                        f">= {TARGETS['mfu']}" if target else "",
                        (v >= TARGETS["mfu"]) if target else None,
                        f"{m[f'{who}_tokens_per_sec']:,.0f} tokens/s",
                    )
                )
    data = results.get("data")
    if data:
        for s in data["loader"]["from_metrics"]:
            rows.append(
                _row(
                    f"loader share of step, {s['run']}",
                    s["share_mean"],
                    f"<= {TARGETS['loader']}",
                    s["share_mean"] <= TARGETS["loader"],
                    f"{s['data_time_s'] * 1e3:.2f} ms of {s['step_time_s']:.3f} s",
                )
            )
        p = data["prepare"]
        for k in ("warm", "cold"):
            v = p[f"ratio_per_core_{k}"]
            rows.append(
                _row(
                    f"prepare/raw tokenizer per core ({'Ray running' if k == 'warm' else 'cold'})",
                    v,
                    f">= {TARGETS['prepare']}",
                    None if v is None else v >= TARGETS["prepare"],
                    f"{p[k]['tokens_per_sec']:,.0f} tok/s on {p['cores']} cores vs "
                    f"{p['raw']['tokens_per_sec']:,.0f} raw",
                )
            )
    ck = results.get("checkpoint")
    if ck:
        bw = ck["disk_write_bytes_per_s"]
        rows.append(_row("disk write + fsync (MiB/s)", bw / 2**20, "", None))
        for name, e in ck["engine"].items():
            rows.append(
                _row(
                    f"checkpoint save+sync s, {name}",
                    e["save_sync_s"],
                    "",
                    None,
                    f"{e['bytes'] / 2**20:.0f} MiB; at disk speed {e['bytes'] / bw:.2f} s; "
                    f"load {e['load_s']:.2f} s",
                )
            )
        r = ck["restart"]
        rows.append(_row("launch -> first step s, fresh run", r["fresh_first_step_s"], "", None))
        rows.append(
            _row("launch -> first new step s, resumed run", r["resumed_first_step_s"], "", None)
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.run_all")
    p.add_argument("--quick", action="store_true", help="the small smoke version of each")
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: the summary of the figures saved in runs/bench/<name>.json",
    )
    args = p.parse_args(argv)
    quick = ["--quick"] if args.quick else []

    from bench import checkpoint, data, interleaved, mfu, stack_overhead

    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    if args.summary_only:
        for name in NAMES:
            path = common.BENCH_DIR / f"{name}.json"
            if path.is_file():
                results[name] = json.loads(path.read_text())
    else:
        results["stack_overhead"] = stack_overhead.main(quick)
        results["interleaved"] = interleaved.main(quick)
        results["mfu"] = mfu.main([*quick, "--reuse"])
        results["data"] = data.main([*quick, "--reuse"])
        results["checkpoint"] = checkpoint.main(quick)
    rows = summary_rows(results)
    common.print_table(
        f"raygpt benchmark summary ({time.perf_counter() - t0:.0f} s)",
        ["figure", "value", "target", "met", "detail"],
        rows,
    )
    for name, r in results.items():
        print(f"{name}: {r['command']}")
    common.print_command("bench.run_all", argv)
    common.write_result("summary", {"rows": rows, "command": common.command("bench.run_all", argv)})
    return results


if __name__ == "__main__":
    main()
