"""Faults counted: the storage work of a run (whole-object puts and reads, a multipart upload,
listings, the start-up probe, the loader's ranged row-group reads and, with --prepare, a real
`python -m data_pipeline.prepare` of the smoke corpus) done once against the moto S3 server
(tests/s3server.py) and once through the fault-injecting proxy (tests/faulty_proxy.py).

Prints, per fault kind, how many the proxy injected, how many of those the client tried again
and how many it survived (the same request went through later), the retries of our own layer
(data_pipeline/storage.py's `retrying`: whole operations the SDK gave up on) and the time lost
to the faults (the faulty pass's wall time less the clean pass's). The result must match the
clean pass byte for byte, which is checked (a mismatch is an error, not a figure).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.storage_faults")
    p.add_argument("--fraction", type=float, default=0.1, help="share of requests faulted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objects", type=int, default=40, help="small objects put and read back")
    p.add_argument("--delay-s", type=float, default=3.0, help="a 'delay' fault holds this long")
    p.add_argument("--request-timeout-s", type=float, default=2.0)
    p.add_argument("--prepare", action="store_true", help="also a real prepare (smoke corpus)")
    return p.parse_args(argv)


def work(prefix: str, args: argparse.Namespace, dataset: Path) -> dict[str, bytes]:
    """The storage work; returns what it read back (compared across the passes)."""
    import numpy as np

    from data_pipeline import storage
    from data_pipeline.loader import TokenShards

    out: dict[str, bytes] = {}
    rng = np.random.default_rng(1)
    for i in range(args.objects):
        uri = f"{prefix}/obj-{i:03d}"
        storage.write_bytes(uri, rng.bytes(2000 + 97 * i))
        out[uri.rsplit("/", 1)[1]] = storage.read_bytes(uri)
    big = rng.bytes(12 << 20)  # a multipart upload (pyarrow's part size is smaller)
    storage.write_bytes(f"{prefix}/big", big)
    out["big"] = storage.read_bytes(f"{prefix}/big")
    out["listing"] = "\n".join(storage.listdir(prefix)).encode()
    storage.check_writable(f"{prefix}/run", "run.root")
    storage.upload(dataset, f"{prefix}/ds")
    shards = TokenShards(f"{prefix}/ds", "train", read_threads=2)
    ids = np.arange(sum(shards._rows))
    out["loader"] = shards.get_batch(ids).tobytes()
    shards.close()
    return out


def prepare(out_dir: str, args: argparse.Namespace) -> float:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline.prepare", "+experiment=smoke",
         f"data.out_dir={out_dir}", f"storage.request_timeout_s={args.request_timeout_s}",
         "storage.base_delay_s=0.2", "storage.max_delay_s=2"],
        cwd=common.ROOT, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"prepare of {out_dir} failed: {proc.stderr.strip()[-2000:]}")
    return time.perf_counter() - started


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    sys.path.insert(0, str(common.ROOT / "tests"))
    from faulty_proxy import faulty_proxy
    from s3server import s3_server
    from synthetic_shards import write_dataset

    from data_pipeline import storage

    common.header("storage faults: the same work through a flaky object store")
    common.print_command("bench.storage_faults", argv)
    storage.configure(
        dataclasses.replace(
            storage.policy(),
            request_timeout_s=args.request_timeout_s,
            base_delay_s=0.2,
            max_delay_s=2.0,
        )
    )
    dataset = write_dataset(
        Path(tempfile.mkdtemp(prefix="raygpt-bench-")) / "ds", [64] * 6, row_group=8
    )
    with s3_server() as s3:
        t0 = time.perf_counter()
        clean = work(s3.uri("clean"), args, dataset)
        clean_s = time.perf_counter() - t0
        prep_clean_s = prepare(s3.uri("clean-data"), args) if args.prepare else None
        before = dataclasses.replace(storage.retry_counts)
        with faulty_proxy(s3, fraction=args.fraction, seed=args.seed, delay_s=args.delay_s) as px:
            t0 = time.perf_counter()
            faulty = work(s3.uri("faulty"), args, dataset)
            faulty_s = time.perf_counter() - t0
            prep_faulty_s = prepare(s3.uri("faulty-data"), args) if args.prepare else None
            report, requests = px.report(), px.requests
        if faulty != clean:
            raise SystemExit("the work through the faults read back other bytes than without")
        if args.prepare:

            def objs(p):
                return {k[len(p) :]: s3.read(k) for k in s3.keys(p) if not k.endswith("/")}

            if objs("clean-data/") != objs("faulty-data/"):
                raise SystemExit("prepare through the faults wrote other bytes than without")
        leftovers = s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    after = storage.retry_counts
    ours = {
        "retried": after.retried - before.retried,
        "survived": after.survived - before.survived,
        "gave_up": after.gave_up - before.gave_up,
        "seconds_waited": round(after.seconds_waited - before.seconds_waited, 2),
    }
    rows = [[k, r["injected"], r["retried"], r["survived"]] for k, r in report.items()]
    rows.append(["all", *(sum(r[c] for r in report.values())
                          for c in ("injected", "retried", "survived"))])  # fmt: skip
    common.print_table(
        f"Faults per kind ({requests} requests through the proxy, fraction {args.fraction}, "
        f"seed {args.seed})",
        ["kind", "injected", "retried", "survived"],
        rows,
        caption="retried: the client sent the same request again; survived: one of those got "
        "through. The results equal the clean pass's byte for byte.",
    )
    lost = faulty_s - clean_s
    print(
        f"storage work: {clean_s:.1f} s clean, {faulty_s:.1f} s through the faults: "
        f"{lost:.1f} s lost"
    )
    if args.prepare:
        print(f"prepare (smoke): {prep_clean_s:.1f} s clean, {prep_faulty_s:.1f} s with faults")
    print(f"whole operations retried by raygpt (the SDK gave up first): {ours}")
    print(f"unfinished multipart uploads left: {len(leftovers)}")
    out = {
        "requests": requests,
        "faults": report,
        "raygpt_retries": ours,
        "clean_s": clean_s,
        "faulty_s": faulty_s,
        "lost_s": lost,
        "prepare_clean_s": prep_clean_s,
        "prepare_faulty_s": prep_faulty_s,
        "unfinished_uploads": len(leftovers),
        "load_average": os.getloadavg()[0],
    }
    common.write_result("storage_faults", out)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.cli(run, parse, argv)


if __name__ == "__main__":
    main()
