"""Cost of a weighted mixture (data_pipeline/mixture.py): what mixing adds to a step.

1. Mapping: global positions -> (source, sample id) for one step (3 sources of 1e9 samples,
   3 stages, block 1000): microseconds per step and positions/s, at the start and 1e12
   positions in (the closed form: no replay, flat), and with 100 segments of history.
2. Memory: tracemalloc peak of mapping one step, at those positions (flat in the position).
3. Reads: MixtureLoader.next_step against DistributedLoader.next_step on the same Parquet
   shards (3 synthetic datasets of seq_len 1024), no prefetch: samples/s each.

    python -m bench.mixture [--global-batch 512] [--steps 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.config import MixtureConfig
from data_pipeline.loader import DistributedLoader, TokenShards
from data_pipeline.manifest import MANIFEST_VERSION, Manifest, ShardInfo, SplitInfo, TokenizerInfo
from data_pipeline.mixture import MixtureLoader, MixturePlan, Segment, plan_stages

BLOCK = 1000
WEIGHTS = {"web": 0.6, "code": 0.3, "math": 0.1}


class Sized:
    """A dataset of n samples that is never read (the mapping benchmark reads nothing)."""

    def __init__(self, n: int, row_len: int = 1025):
        self.n, self.row_len, self.split = n, row_len, "train"

    def __len__(self) -> int:
        return self.n


def mixture(dirs: dict[str, str]) -> MixtureConfig:
    return MixtureConfig.from_dict(
        {
            "sources": {n: {"dir": dirs[n], "weight": w} for n, w in WEIGHTS.items()},
            "stages": [
                {"step": 1000, "weights": {"web": 0.4, "code": 0.4, "math": 0.2}},
                {"step": 5000, "weights": {"web": 0.2, "code": 0.5, "math": 0.3}},
            ],
            "block": BLOCK,
        }
    )


def mapping(global_batch: int, repeats: int = 20) -> dict[str, Any]:
    mix = mixture({n: n for n in WEIGHTS})
    datasets = {n: Sized(10**9) for n in WEIGHTS}
    loader = MixtureLoader(
        datasets, mix, global_batch=global_batch, micro_batch=global_batch, dp_rank=0, dp_size=1,
        seed=1, prefetch=False,
    )  # fmt: skip
    out: dict[str, Any] = {}
    for label, at in (("start", 0), ("1e12 in", 10**12 - 10**12 % global_batch)):
        out[label] = time_step(loader, at, repeats)
    # 100 segments of history (weights changed at 100 resumes): the table grows, a step not
    history = [
        Segment(k * 10**9, {"web": 600 - k, "code": 300 + k, "math": 100}) for k in range(100)
    ]
    loader.plan = MixturePlan(plan_stages(mix, global_batch), 1, history=history, resume_at=10**11)
    out["100 segments"] = time_step(loader, 10**11, repeats)
    return out


def time_step(loader: MixtureLoader, at: int, repeats: int) -> dict[str, float]:
    loader.step_samples(at)  # warm
    t0 = time.process_time()  # CPU time: a busy machine's neighbours do not count
    for k in range(repeats):
        loader.step_samples(at + k * loader.global_batch)
    per_step = (time.process_time() - t0) / repeats
    tracemalloc.start()
    loader.step_samples(at + repeats * loader.global_batch)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "us_per_step": per_step * 1e6,
        "positions_per_s": loader.global_batch / per_step,
        "peak_kib": peak / 1024,
    }


def write_dataset(root: Path, rows: int, seq_len: int, tag: int) -> str:
    root.mkdir(parents=True)
    row_len = seq_len + 1
    values = np.random.default_rng(tag).integers(0, 50000, rows * row_len, dtype=np.int32)
    shards, per_shard = [], 1024
    for k, first in enumerate(range(0, rows, per_shard)):
        n = min(per_shard, rows - first)
        flat = pa.array(values[first * row_len : (first + n) * row_len])
        column = pa.FixedSizeListArray.from_arrays(flat, row_len)
        pq.write_table(
            pa.table({"tokens": column}), root / f"train-{k}.parquet", row_group_size=256
        )
        shards.append(ShardInfo(file=f"train-{k}.parquet", rows=n))
    split = SplitInfo(shards=shards, num_samples=rows, num_tokens=rows * row_len)
    Manifest(
        version=MANIFEST_VERSION, name=root.name,
        tokenizer=TokenizerInfo(file="tokenizer.json", sha256="0" * 64, vocab_size=50000, eos_id=0),
        seq_len=seq_len, splits={"train": split, "val": SplitInfo()}, sources=[], num_documents={},
        settings={}, fingerprint=root.name, created="2024-01-01T00:00:00+00:00",
    ).save(root)  # fmt: skip
    return str(root)


def reads(global_batch: int, steps: int, rows: int = 4096, seq_len: int = 1024) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {n: write_dataset(Path(tmp, n), rows, seq_len, k) for k, n in enumerate(WEIGHTS)}
        args = dict(global_batch=global_batch, micro_batch=global_batch, dp_rank=0, dp_size=1, seed=1, prefetch=False)  # fmt: skip
        shards = {n: TokenShards(d, "train") for n, d in dirs.items()}
        mixed = MixtureLoader(shards, mixture(dirs), **args)
        single = DistributedLoader(TokenShards(dirs["web"], "train"), **args)
        out = {}
        for label, loader in (("single", single), ("mixture", mixed)):
            loader.next_step()  # warm: footers, first row groups
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                loader.next_step()
            out[f"{label}_samples_per_s"] = steps * global_batch / (time.perf_counter() - t0)
            out[f"{label}_samples_per_cpu_s"] = steps * global_batch / (time.process_time() - c0)
            loader.close()
        for s in [*shards.values(), single.shards]:
            s.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    print(f"$ python -m bench.mixture --global-batch {a.global_batch} --steps {a.steps}")
    result: dict[str, Any] = {"global_batch": a.global_batch, "block": BLOCK}
    result["mapping"] = mapping(a.global_batch)
    print(f"mapping one step of {a.global_batch} positions (3 sources of 1e9, 3 stages), CPU time:")
    for label, r in result["mapping"].items():
        print(
            f"  {label:>12}: {r['us_per_step']:8.0f} us/step  {r['positions_per_s']:12,.0f} "
            f"positions/s  peak {r['peak_kib']:7.0f} KiB"
        )
    result["reads"] = reads(min(a.global_batch, 64), a.steps)
    r = result["reads"]
    print(
        f"reads (seq 1024, batch {min(a.global_batch, 64)}, no prefetch): single dataset "
        f"{r['single_samples_per_s']:,.0f} samples/s, mixture {r['mixture_samples_per_s']:,.0f} "
        f"samples/s ({r['mixture_samples_per_s'] / r['single_samples_per_s']:.2f}x); per CPU "
        f"second {r['single_samples_per_cpu_s']:,.0f} and {r['mixture_samples_per_cpu_s']:,.0f}"
    )
    try:
        from bench.common import write_result

        print(f"saved {write_result('mixture', result)}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
