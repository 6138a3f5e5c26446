"""The data order and the reads at pretraining scale: a corpus of about 1e9 samples of 1,025
tokens (seq_len 1024).

The corpus is a synthetic manifest of 244,141 shard entries of 4,096 rows (1,000,001,536
samples) that point at 4 real Parquet files (random int32 tokens, zstd, row groups of 1,024
rows, as prepare writes them). The loader treats every entry as its own shard: its own footer
read, its own row groups, its own cache entries, so reads are those of a real corpus of that
size (only the bytes repeat).

Printed:
1. Time to the first batch: Manifest.load of the 244,141 entries + TokenShards +
   DistributedLoader + the first next_step (cold: no footer or row group read before).
2. Memory of the order: peak bytes traced (tracemalloc) while computing one rank's sample ids of
   a step at 1e6, 1e8 and 1e9 samples, blocks-v1 against the old materialised permutation (run
   at 1e6 and 1e7; 8 bytes a sample beyond).
3. Samples/s of one rank (global batch 512, dp_size 8: 64 samples a step, rank 0) over --steps
   steps from mid-corpus, from local disk and from moto's S3 server (tests/s3server.py) behind
   a TCP proxy of this file that adds --latency-ms to every new connection and to every request
   sent through it; next_step() back to back (the loader's own rate), and with a training step
   of 64 / --consume seconds between calls (500 samples/s: one H100 at gpt2-124m), where the
   figure is how long next_step() kept the trainer waiting.

    python -m bench.loader_scale [--steps 200] [--latency-ms 50] [--consume 500]
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench import common  # noqa: F401  (the benchmarks' environment)
from data_pipeline.config import DataConfig
from data_pipeline.loader import DistributedLoader, TokenShards
from data_pipeline.manifest import MANIFEST_VERSION
from data_pipeline.order import PERMUTATION, Order

SEQ_LEN = 1024
ROWS_PER_SHARD = 4096
ROW_GROUP = 1024
REAL_FILES = 4
SHARDS = 244_141  # x 4096 rows = 1,000,001,536 samples
GLOBAL_BATCH, DP_SIZE, MICRO = 512, 8, 8


def write_real_files(root: Path) -> None:
    rng = np.random.default_rng(0)
    row = SEQ_LEN + 1
    for k in range(REAL_FILES):
        values = rng.integers(0, 50257, ROWS_PER_SHARD * row, dtype=np.int32)
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(values), row)})
        pq.write_table(
            table, root / f"real-{k}.parquet", compression="zstd", row_group_size=ROW_GROUP
        )


def manifest_json(shards: int) -> str:
    n = shards * ROWS_PER_SHARD
    entries = [
        {"file": f"real-{k % REAL_FILES}.parquet", "rows": ROWS_PER_SHARD} for k in range(shards)
    ]
    return json.dumps(
        {
            "version": MANIFEST_VERSION,
            "name": "synthetic-1e9",
            "tokenizer": {
                "file": "tokenizer.json",
                "sha256": "0" * 64,
                "vocab_size": 50257,
                "eos_id": 0,
            },
            "seq_len": SEQ_LEN,
            "splits": {
                "train": {
                    "shards": entries,
                    "num_samples": n,
                    "num_tokens": n * (SEQ_LEN + 1),
                    "dropped_tokens": 0,
                },
                "val": {"shards": [], "num_samples": 0, "num_tokens": 0, "dropped_tokens": 0},
            },
            "sources": ["synthetic"],
            "num_documents": {"train": n, "val": 0},
            "settings": {},
            "fingerprint": "synthetic",
            "created": "2026-11-28T00:00:00+00:00",
            "stats": {},
        }
    )


def make_loader(data_dir: str, consumed: int, settings: dict[str, int]):
    shards = TokenShards(data_dir, "train", read_threads=settings["read_threads"])
    loader = DistributedLoader(
        shards,
        prefetch_steps=settings["prefetch_steps"],
        global_batch=GLOBAL_BATCH,
        micro_batch=MICRO,
        dp_rank=0,
        dp_size=DP_SIZE,
        seed=1234,
        consumed_samples=consumed,
    )
    return shards, loader


def measure(data_dir: str, args: argparse.Namespace, compute_s: float) -> dict:
    """Time to the first batch (manifest load included) and samples/s of rank 0 over
    args.steps steps, "training" compute_s between them (sleeping: the prefetch threads run
    meanwhile), and the mean time next_step() kept the caller waiting."""
    settings = {"prefetch_steps": args.prefetch_steps, "read_threads": args.read_threads}
    start = time.perf_counter()
    shards, loader = make_loader(data_dir, args.consumed, settings)
    loader.next_step()
    first = time.perf_counter() - start
    waited = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        time.sleep(compute_s)
        t = time.perf_counter()
        loader.next_step()
        waited += time.perf_counter() - t
    seconds = time.perf_counter() - start
    loader.close()
    shards.close()
    return {
        "first_batch_s": first,
        "samples_per_s": args.steps * (GLOBAL_BATCH // DP_SIZE) / seconds,
        "wait_ms": 1000 * waited / args.steps,
        "row_groups_read": shards._groups.loads,
        "footers_read": shards._footers.loads,
    }


def order_memory() -> list[tuple[str, int, int]]:
    """(order, N, peak traced bytes) of one rank's sample ids for a step."""
    positions = 3 * 10**5 + np.arange(GLOBAL_BATCH // DP_SIZE, dtype=np.int64)
    out = []
    for kind, sizes in (("blocks-v1", (10**6, 10**8, 10**9)), (PERMUTATION, (10**6, 10**7))):
        for n in sizes:
            order = Order(kind)
            order.sample_ids(positions, n, seed=1)  # imports, caches
            tracemalloc.start()
            order.sample_ids(positions + n, n, seed=1)  # another epoch: nothing cached
            out.append((kind, n, tracemalloc.get_traced_memory()[1]))
            tracemalloc.stop()
    return out


class LatencyProxy:
    """A TCP proxy to `target` that waits latency_s on every new connection and before
    forwarding each chunk the client sends (one HTTP request each), in threads."""

    def __init__(self, target: tuple[str, int], latency_s: float):
        self.target, self.latency_s = target, latency_s
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        time.sleep(self.latency_s)
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(upstream, client, 0.0), daemon=True).start()
        self._pump(client, upstream, self.latency_s)

    def _pump(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while data := src.recv(1 << 16):
                if delay:
                    self.requests += 1
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def both_sources(root: Path, args: argparse.Namespace) -> dict[tuple[str, float], dict]:
    """(source, compute seconds per step) -> measure(): local disk, then moto's S3 server
    behind the latency proxy; without compute (the loader's own rate) and at args.consume
    samples/s."""
    import os

    from tests.s3server import s3_server

    per_step = (GLOBAL_BATCH // DP_SIZE) / args.consume
    out = {("local", c): measure(str(root), args, c) for c in (0.0, per_step)}
    with s3_server() as s3:
        client = s3.client()
        for f in sorted(root.iterdir()):
            client.upload_file(str(f), s3.bucket, f"corpus/{f.name}")
        port = int(s3.endpoint.rsplit(":", 1)[1])
        proxy = LatencyProxy(("127.0.0.1", port), args.latency_ms / 1000)
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
        try:
            for c in (0.0, per_step):
                out[("s3", c)] = measure(s3.uri("corpus"), args, c)
        finally:
            proxy.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--consumed", type=int, default=512_000_000)  # mid-corpus
    parser.add_argument("--consume", type=float, default=500.0, help="samples/s a rank trains")
    parser.add_argument("--prefetch-steps", type=int, default=DataConfig().prefetch_steps)
    parser.add_argument("--read-threads", type=int, default=DataConfig().read_threads)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="raygpt-loader-scale-") as tmp:
        root = Path(tmp)
        write_real_files(root)
        (root / "manifest.json").write_text(manifest_json(SHARDS))
        print(f"corpus: {SHARDS:,} shard entries x {ROWS_PER_SHARD} rows = "
              f"{SHARDS * ROWS_PER_SHARD:,} samples of {SEQ_LEN + 1} tokens; manifest "
              f"{(root / 'manifest.json').stat().st_size / 1e6:.1f} MB; {REAL_FILES} real files of "
              f"{(root / 'real-0.parquet').stat().st_size / 1e6:.1f} MB (row groups of {ROW_GROUP})")  # fmt: skip
        results = both_sources(root, args)
    print(f"\nrank 0 of dp_size {DP_SIZE}, global batch {GLOBAL_BATCH} ({GLOBAL_BATCH // DP_SIZE} "
          f"samples a step), {args.steps} steps from position {args.consumed:,}; "
          f"prefetch_steps {args.prefetch_steps}, read_threads {args.read_threads}; S3: moto "
          f"behind a proxy adding {args.latency_ms:.0f} ms per connection and per request")  # fmt: skip
    print(f"{'source':<8}{'training':>22}{'first batch s':>15}{'samples/s':>11}{'wait ms/step':>14}"
          f"{'row groups':>12}{'footers':>9}")  # fmt: skip
    for (source, compute), r in results.items():
        training = f"{compute * 1000:.0f} ms/step" if compute else "none (loader only)"
        print(f"{source:<8}{training:>22}{r['first_batch_s']:>15.2f}{r['samples_per_s']:>11.0f}"
              f"{r['wait_ms']:>14.1f}{r['row_groups_read']:>12}{r['footers_read']:>9}")  # fmt: skip
    for compute in sorted({c for _, c in results}):
        local, remote = results[("local", compute)], results[("s3", compute)]
        what = f"at {compute * 1000:.0f} ms/step" if compute else "loader only"
        print(f"S3 / local ({what}): {remote['samples_per_s'] / local['samples_per_s']:.2f}")
    print(f"\n{'order':<14}{'samples':>16}{'peak traced bytes':>20}")
    for kind, n, peak in order_memory():
        print(f"{kind:<14}{n:>16,}{peak:>20,}")
    print(f"{'permutation':<14}{10**9:>16,}{8 * 10**9:>20,}  (8 bytes a sample: not run)")


if __name__ == "__main__":
    main()
