"""The worker's GPU path in one process, without Ray: what a Ray Train GPU worker runs, on a
bare single-GPU machine (NCCL, world size 1, MASTER_ADDR/PORT from the environment).

One invocation = one model at one ZeRO stage (bench/gpu_check.sh runs each under its own
`timeout`). It composes the real config (trainer.config.load_config: conf/model/<model>.yaml,
conf/parallel/..., precision=bf16), builds the model (ZeRO-3: partitioned, deepspeed.zero.Init
+ init_weights on gathered modules) and the engine with trainer.worker.engine, and then:

  train   warm-up steps, then timed steps of trainer.worker.engine.train_step on host batches
          (the loader's kind: train_step moves them to engine.device); tokens/s and MFU
          against the GPU's datasheet bf16 peak (metrics.peak_flops_per_worker, device=
          engine.device), under torch.nn.attention.sdpa_kernel(FLASH_ATTENTION) on CUDA
  eval    eval_losses on held-out batches: finite
  guard   a NaN injected (train_step poison=True, judged by the LossGuard): the step is
          skipped, the parameters are unchanged, and the next step trains
  ckpt    trainer.checkpoint.format.save_local / load (weights_only load through
          ds_patches): the eval loss after a restore equals the one at the save
  gen     engine.module.generate on a prompt moved with to_device (the worker's sample)
  bare    (--bare, instead of the above) the same model in a bare PyTorch loop: plain AdamW
          (fused on CUDA), torch.autocast bf16, same micro batches: the yardstick

Prints one line "RESULT <json>" (also appended to --out). --cpu-dry-run runs the same code on
the CPU (DS_ACCELERATOR=cpu, gloo) with a tiny model: proof that it executes end to end.

    python -m bench.gpu_check --model gpt2-124m --stage 2 [--checkpoint] [--generate]
    python -m bench.gpu_check --model gpt2-124m --bare
    python -m bench.gpu_check --summary results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The dry run's model: small enough for seconds on 2 CPU cores.
TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.vocab_size=512",
    "model.block_size=64",
    "data.vocab_size=512",
]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-124m", help="conf/model/<name>.yaml")
    p.add_argument("--stage", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument("--micro", type=int, default=None, help="micro batch (default per model)")
    p.add_argument("--accum", type=int, default=1, help="micro batches per step")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: block)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--bare", action="store_true", help="the bare PyTorch loop instead")
    p.add_argument("--checkpoint", action="store_true", help="save_local + load round trip")
    p.add_argument("--generate", action="store_true", help="engine.module.generate")
    p.add_argument("--no-guard", action="store_true", help="skip the NaN-skip check")
    p.add_argument(
        "--sdpa",
        choices=("flash", "default"),
        default=None,
        help="attention kernel (default: flash on CUDA, PyTorch's choice on CPU)",
    )
    p.add_argument(
        "--peak-flops",
        type=float,
        default=None,
        help="trainer.peak_flops (default: the GPU's datasheet figure)",
    )
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="CPU, gloo, a tiny model: proves the script runs end to end",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more config override, e.g. optim.fused=true (repeatable)",
    )
    p.add_argument("--out", default=None, help="append the RESULT json line to this file")
    p.add_argument(
        "--summary",
        default=None,
        metavar="JSONL",
        help="print the table of a results file and exit",
    )
    return p.parse_args(argv)


def setup_env(cpu: bool) -> None:
    """A single-process 'cluster' before torch/deepspeed are imported: the accelerator comes
    from here (as cluster/launch.py's worker_env sets it for a Ray worker), never from what
    the host has."""
    os.environ["DS_ACCELERATOR"] = "cpu" if cpu else "cuda"
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_WORLD_SIZE", "1"),
    ):
        os.environ.setdefault(k, v)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")


def load_cfg(args: argparse.Namespace):
    from trainer.config import load_config

    model_defaults = {"gpt2-124m": (16, 1024), "gpt-1.3b": (8, 2048)}
    micro, seq = model_defaults.get(args.model, (8, 256))
    if args.cpu_dry_run:
        micro, seq = 2, 64
    micro, seq = args.micro or micro, args.seq or seq
    parallel = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}[args.stage]
    overrides = [
        f"model={args.model}",
        f"parallel={parallel}",
        "precision=bf16",
        "cluster=local",
        "cluster.num_workers=1",
        f"trainer.micro_batch_size={micro}",
        f"trainer.global_batch_size={micro * args.accum}",
        f"data.seq_len={seq}",
        "logging.mode=disabled",
    ]
    if args.stage == 3:
        overrides.append("parallel.partitioned_init=true")  # no rank holds the whole model
    if args.peak_flops:
        overrides.append(f"trainer.peak_flops={args.peak_flops:g}")
    if args.cpu_dry_run:
        overrides += TINY
    return load_config(overrides + args.set)


def host_batches(cfg, n: int, seed: int):
    """n (x, y) micro batches of random tokens in host memory, as the loader yields them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    micro, seq, vocab = cfg.trainer.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(n):
        row = torch.randint(0, vocab, (micro, seq + 1), generator=g)
        out.append((row[:, :-1].contiguous(), row[:, 1:].contiguous()))
    return out


def sdpa_context(args: argparse.Namespace, cuda: bool):
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = args.sdpa or ("flash" if cuda else "default")
    if kind == "flash":  # an error, not a silent fallback, where flash cannot run
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


def sync(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()


def peak_of(cfg, device) -> tuple[float | None, str | None]:
    from trainer.worker.observability.metrics import peak_flops_per_worker

    try:
        return peak_flops_per_worker(
            cfg.precision.dtype_name,
            cfg.cluster.threads_per_worker,
            cfg.trainer.peak_flops,
            device=device,
        ), None
    except ValueError as e:  # UnknownGPUError: the rule, reported, not hidden
        return None, str(e)


def device_info(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def local_state(engine) -> list:
    """Copies of this rank's share of the first few parameters (ZeRO-3: the partitions)."""
    out = []
    for i, p in enumerate(engine.module.parameters()):
        if i == 4:
            break
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        out.append(t.detach().float().cpu().clone())
    return out


def run_engine(args: argparse.Namespace, cfg) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from models.gpt import estimate_flops_per_token, estimate_num_params
    from trainer.checkpoint import format as checkpoint
    from trainer.config import GuardConfig
    from trainer.worker.ds_patches import ENGINE_PATCHES as PATCHES
    from trainer.worker.engine import (
        accelerator_device_type,
        build_engine,
        build_model,
        comm_backend,
        eval_losses,
        to_device,
        train_step,
    )
    from trainer.worker.guard import LossGuard, StepJudge
    from trainer.worker.observability.metrics import StepTimes, memory_stats

    want = "cpu" if args.cpu_dry_run else "cuda"
    assert accelerator_device_type() == want, (accelerator_device_type(), want)
    if want == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    t, res = cfg.trainer, {}
    sizes = dict(layout=cfg.layout, micro_batch=t.micro_batch_size, grad_accum=cfg.grad_accum)
    t0 = time.perf_counter()
    model = build_model(cfg.model, cfg.parallel, cfg.precision, cfg.optim, seed=t.seed, **sizes)
    res["backend"] = dist.get_backend()
    assert res["backend"] == comm_backend() == ("gloo" if want == "cpu" else "nccl"), res
    # As trainer/worker/loop.py builds it, so --set trainer.compile=true acts here too.
    engine = build_engine(
        model, cfg.parallel, cfg.precision, cfg.optim, compile=t.compile,
        contiguous_weight_grad=t.contiguous_weight_grad, **sizes,
    )  # fmt: skip
    res["build_s"] = time.perf_counter() - t0
    device = engine.device
    assert device.type == want, device
    cuda = device.type == "cuda"
    res.update(device_info(device))
    lr = cfg.optim.lr
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * 0.1  # a gentle constant rate: the figures are speed, not learning

    train = host_batches(cfg, cfg.grad_accum, seed=1)
    val = host_batches(cfg, 2, seed=2)
    timer = StepTimes(cuda=cuda)
    with sdpa_context(args, cuda):
        first = time.perf_counter()
        for _ in range(args.warmup):
            losses, _, _ = train_step(engine, train, tp=1, timer=timer)
        sync(cuda)
        res["warmup_s"] = time.perf_counter() - first
        timer.lap()
        start = time.perf_counter()
        for _ in range(args.steps):
            losses, norm, skipped = train_step(engine, train, tp=1, timer=timer)
        sync(cuda)
        dt = time.perf_counter() - start
        res["phases"] = timer.lap()
        res["loss"] = float(torch.stack([x.float() for x in losses]).mean())
        res["grad_norm"] = None if norm is None else float(norm)
        assert math.isfinite(res["loss"]) and not skipped, res

        res["eval_loss"] = sum(eval_losses(engine, val)) / len(val)
        assert math.isfinite(res["eval_loss"]), res

        if not args.no_guard:
            guard = LossGuard(GuardConfig(warmup_steps=0))
            judge = StepJudge(guard)
            before = local_state(engine)
            losses, _, skipped = train_step(engine, train, tp=1, judge=judge, poison=True)
            after = local_state(engine)
            res["guard"] = {
                "skipped": skipped,
                "reason": judge.reason,
                "params_unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
            }
            judge.settle(skipped)
            judge.reset()
            losses, _, skipped_next = train_step(engine, train, tp=1, judge=judge)
            res["guard"]["next_step_trains"] = not skipped_next and not torch.equal(
                before[0], local_state(engine)[0]
            )
            assert skipped and res["guard"]["params_unchanged"], res["guard"]
            assert res["guard"]["next_step_trains"], res["guard"]

        if args.checkpoint:
            at_save = eval_losses(engine, val)
            c0 = time.perf_counter()
            local = checkpoint.save_local(engine, 0, {"step": 1, "config": {}}, PATCHES).finish()
            res["ckpt_save_s"] = time.perf_counter() - c0
            res["ckpt_bytes"] = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
            train_step(engine, train, tp=1)  # moves the weights away from the saved ones
            moved = eval_losses(engine, val)
            c0 = time.perf_counter()
            state = checkpoint.load(engine, local, 0, PATCHES)
            res["ckpt_load_s"] = time.perf_counter() - c0
            restored = eval_losses(engine, val)
            shutil.rmtree(local, ignore_errors=True)
            res["ckpt"] = {
                "at_save": at_save,
                "moved": moved,
                "restored": restored,
                "step": state["step"],
            }
            assert all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(at_save, restored)), res
            assert moved != at_save, res["ckpt"]

        if args.generate:
            engine.eval()
            torch.manual_seed(t.seed)
            prompt = to_device(torch.tensor([[1, 2, 3]], dtype=torch.long), device)
            g0 = time.perf_counter()
            out = engine.module.generate(prompt, max_new_tokens=32, temperature=0.8, top_k=50)
            sync(cuda)
            engine.train()
            res["generate_s"] = time.perf_counter() - g0
            res["generated"] = out[0].tolist()[3:13]
            assert tuple(out.shape) == (1, 35) and out.device.type == device.type, out.shape

    tokens = args.steps * t.global_batch_size * cfg.data.seq_len
    flops_per_token = estimate_flops_per_token(cfg.model, cfg.data.seq_len)
    peak, peak_error = peak_of(cfg, device)
    res.update(
        tokens_per_sec=tokens / dt,
        step_time_s=dt / args.steps,
        flops_per_token=flops_per_token,
        num_params=estimate_num_params(cfg.model),
        peak_flops=peak,
        mfu=(tokens / dt) * flops_per_token / peak if peak else None,
        memory=memory_stats(device=device),
    )
    if peak_error:
        res["peak_error"] = peak_error
    return res


def run_bare(args: argparse.Namespace, cfg) -> dict[str, Any]:
    """The same model, batches and step count in a bare PyTorch loop: fp32 weights, plain
    AdamW (fused on CUDA), torch.autocast bf16, gradient clipping."""
    import torch

    from models.gpt import GPT, estimate_flops_per_token
    from trainer.worker.engine import init_weights, to_device
    from trainer.worker.optimizer import param_groups

    cuda = not args.cpu_dry_run
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    t, o = cfg.trainer, cfg.optim
    model = GPT(cfg.model)
    init_weights(model, t.seed)
    model.to(device)
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr * 0.1,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=cuda or None,
    )
    train = host_batches(cfg, cfg.grad_accum, seed=1)

    def step() -> torch.Tensor:
        losses = []
        for x, y in train:
            x, y = to_device(x, device), to_device(y, device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                _, loss = model(x, y)
            (loss / len(train)).backward()
            losses.append(loss.detach())
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return torch.stack(losses).mean()

    res: dict[str, Any] = device_info(device)
    with sdpa_context(args, cuda):
        for _ in range(args.warmup):
            step()
        sync(cuda)
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync(cuda)
        dt = time.perf_counter() - start
    tokens = args.steps * t.global_batch_size * cfg.data.seq_len
    flops_per_token = estimate_flops_per_token(cfg.model, cfg.data.seq_len)
    peak, peak_error = peak_of(cfg, device)
    res.update(
        loss=float(loss),
        tokens_per_sec=tokens / dt,
        step_time_s=dt / args.steps,
        flops_per_token=flops_per_token,
        peak_flops=peak,
        mfu=(tokens / dt) * flops_per_token / peak if peak else None,
    )
    if peak_error:
        res["peak_error"] = peak_error
    assert math.isfinite(res["loss"]), res
    return res


def summary(path: str) -> None:
    """The results file as a table: engine vs bare tokens/s per model."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    bare = {r["model"]: r for r in rows if r.get("kind") == "bare" and r.get("ok")}
    print(f"{'model':<10} {'run':<8} {'ok':<4} {'tokens/s':>10} {'MFU':>7} {'vs bare':>8}  notes")
    for r in rows:
        run = "bare" if r.get("kind") == "bare" else f"zero{r.get('stage')}"
        if r.get("set"):
            run += "+" + ",".join(o.split(".")[-1] for o in r["set"])
        tps, mfu = r.get("tokens_per_sec"), r.get("mfu")
        b = bare.get(r["model"])
        vs = f"{tps / b['tokens_per_sec']:.2f}" if tps and b and run != "bare" else ""
        notes = []
        if r.get("error"):
            notes.append(r["error"])
        if r.get("peak_error"):
            notes.append(r["peak_error"])
        if "guard" in r:
            notes.append(
                f"guard skip ok={r['guard']['skipped'] and r['guard']['params_unchanged']}"
            )
        if "ckpt" in r:
            notes.append(
                f"ckpt {r.get('ckpt_bytes', 0) / 2**20:.0f} MiB "
                f"save {r['ckpt_save_s']:.1f}s load {r['ckpt_load_s']:.1f}s"
            )
        if "memory" in r and "cuda_peak_mib" in r["memory"]:
            notes.append(f"peak {r['memory']['cuda_peak_mib']:.0f} MiB")
        print(
            f"{r['model']:<10} {run:<8} {str(bool(r.get('ok'))):<4} "
            f"{(tps or 0):>10.0f} {(100 * mfu if mfu else float('nan')):>6.1f}% {vs:>8}  "
            + "; ".join(notes)
        )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.summary:
        summary(args.summary)
        return 0
    setup_env(args.cpu_dry_run)
    result: dict[str, Any] = {
        "model": args.model,
        "kind": "bare" if args.bare else "engine",
        "stage": None if args.bare else args.stage,
        "cpu_dry_run": args.cpu_dry_run,
        "set": args.set,
    }
    try:
        cfg = load_cfg(args)
        result.update(
            micro=cfg.trainer.micro_batch_size, accum=cfg.grad_accum, seq=cfg.data.seq_len
        )
        result.update(run_bare(args, cfg) if args.bare else run_engine(args, cfg))
        result["ok"] = True
    except Exception as e:  # reported as a result row: the next step still runs
        traceback.print_exc()
        result.update(
            ok=False,
            error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if str(e)
            else type(e).__name__,
        )
    line = json.dumps(result, default=str)
    print("RESULT " + line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # DeepSpeed's CPU shared-memory comm (and NCCL teardown) can abort at interpreter exit
    # after the result is written; skip the C++ teardown.
    os._exit(code)
