"""raygpt's single-process worker path against an independent reference
(tests/reference/loop.py): a plain PyTorch loop that imports nothing from trainer/ or cluster/
and writes the optimizer, LR schedule, clipping, loss, gradient accumulation and data order
again from their documented rules. fp32, 10 steps, the parity corpus, for the gpt-tiny shape
and a llama-style shape (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied
head): every step's loss within 1e-5 relative, the same samples in the same steps, the same
consumed samples, the same learning rates and gradient norms.

The worker path is raygpt's own Trainer (build, then step() as train() calls it) in child
processes joined by a gloo process group, as a Ray Train worker runs it but without Ray (whose
start-up would take most of this file's time): Ray's worker context is the one thing stubbed.
The whole Ray path is held to the reference through the golden file that
tests/dist/test_parity.py compares its single-process run with (made by the reference loop:
python -m tests.reference.make_golden).

The llama-style shape also runs tensor-parallel (TP=2: 4 query heads and 2 key/value heads
split over 2 ranks, RoPE applied per shard), held to the single-process run with the parity
matrix's tensor-parallel tolerance (tests/dist/test_parity.py); both shapes run sequence
parallel (Ulysses SP=2, ZeRO-2), held to the single-process run and the reference (1e-4).
"""

from __future__ import annotations

import json
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from reference.corpus import BASE, GPT_TINY, STEPS, prepare_corpus, write_corpus
from reference.loop import Recipe, step_sample_ids, train, train_rows
from single_engine import run_ranks

from models.gpt import GPTConfig, shape_of
from trainer.config import load_config

pytestmark = pytest.mark.timeout(1800)

# Llama-3.2's family at the smoke size: conf/model/llama-1b.yaml with the smoke experiment's
# width and depth, 2 key/value heads for 4 query heads, an untied head.
LLAMA = [
    *(o if o != "model=gpt-tiny" else "model=llama-1b" for o in BASE),
    "model.n_kv_head=2", "model.d_ff=192", "model.tie_embeddings=false",
    "model.activation_checkpointing=false",
]  # fmt: skip
LLAMA_TINY = GPTConfig(
    vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=192,
    pos_embedding="rope", rope_theta=500000.0, norm="rmsnorm", mlp="swiglu", bias=False,
    tie_embeddings=False,
)  # fmt: skip
SHAPES = {"gpt-tiny": (BASE, GPT_TINY), "llama-tiny": (LLAMA, LLAMA_TINY)}
# What BASE sets, written out; the rest are raygpt's defaults (seed 1337, OptimConfig).
RECIPE = Recipe(steps=STEPS, global_batch=8, micro_batch=2, warmup=3)
LAYOUTS = {  # name -> (overrides, processes)
    "single": (["parallel=ddp", "cluster.num_workers=1", "cluster.cpus_per_worker=1"], 1),
    "tp2": (["parallel=tp2", "cluster.num_workers=2", "cluster.cpus_per_worker=1"], 2),
    # Ulysses sequence parallelism over 2 ranks at ZeRO-2 (the slices' gradients reduced and
    # partitioned over both ranks): 64-token samples cut into 2 x 32.
    # 3-D at its smallest: tensor 2 x pipeline 2 (raygpt's tensor-parallel blocks in each of
    # DeepSpeed's pipeline stages), ZeRO-1.
    "tp2xpp2": (["parallel=3d", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5"], 4),
    "sp2": (
        ["parallel.sequence_parallel=2", "cluster.num_workers=2", "cluster.cpus_per_worker=1"],
        2,
    ),
}

# One rank of one or more runs: raygpt's Trainer, built and stepped as Trainer.train() does (no
# eval, checkpoint or summary), with a worker context of its own. argv: the prepared data
# directory, then each run as JSON {"name", "overrides"}; prints {name: rows}.
WORKER = textwrap.dedent(
    """
    import json, os, sys, types
    from trainer.config import load_config
    from trainer.worker.entry import WorkerConfig
    from trainer.worker.loop import Trainer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    context = types.SimpleNamespace(
        rank=rank, world_size=world, node_id=lambda: "local", stop_requested=lambda: None
    )
    out = {}
    for run in map(json.loads, sys.argv[2:]):
        cfg = load_config(run["overrides"])
        assert world == cfg.cluster.num_workers, (world, cfg.cluster.num_workers)
        rows = out[run["name"]] = []
        config = WorkerConfig(cfg=cfg, data_dir=sys.argv[1], invocation="parity", peak_flops=1e12)
        t = Trainer(config, context)
        t.build()
        t.start_logging()
        while t.state.step < t.last_step:
            ids = t.train_loader.sample_ids_for_step(t.train_loader.consumed_samples)
            assert not t.step(), "the guard asked for a rollback"
            m = t.last_metrics
            rows.append({"step": t.state.step, "ids": [int(i) for i in ids],
                         **{k: m[k] for k in ("loss", "lr", "grad_norm", "consumed_samples")}})
        t.close()
    print("RESULT " + json.dumps(out))
    """
)


def max_rel(got: list[float], want: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(got, want))


def test_the_reference_shares_no_code_with_raygpt_but_the_model():
    """loop.py imports the standard library, numpy, pyarrow, torch and models/ only."""
    import ast

    import reference.loop

    tree = ast.parse(Path(reference.loop.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported}
    assert roots <= set(sys.stdlib_module_names) | {"numpy", "pyarrow", "torch", "models"}, roots


@pytest.mark.parametrize("shape", list(SHAPES))
def test_reference_trains_the_model_raygpt_configures(shape):
    overrides, model = SHAPES[shape]
    assert shape_of(load_config(overrides).model) == shape_of(model)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """The parity corpus, prepared by raygpt's prepare (it starts and stops its own Ray)."""
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    out_dir = tmp_path_factory.mktemp("data") / "p"
    prepare_corpus(corpus, out_dir)
    return str(out_dir)


def raygpt_runs(root, data_dir: str, layout: str, shapes: list[str]) -> dict[str, list[dict]]:
    """shape -> rank 0's rows (one per step) of a `layout` run of each shape, in one set of
    processes."""
    overrides, world = LAYOUTS[layout]
    runs = [
        json.dumps({"name": shape, "overrides": [*SHAPES[shape][0], *overrides,
                    f"run.root={root}", f"run.name={shape}-{layout}"]})
        for shape in shapes
    ]  # fmt: skip
    ranks = run_ranks(WORKER, data_dir, *runs, world=world, timeout=900)
    assert all(r == ranks[0] for r in ranks), "ranks logged different steps"
    return ranks[0]


@pytest.fixture(scope="module")
def raygpt(tmp_path_factory, data_dir) -> dict[str, dict[str, list[dict]]]:
    """layout -> shape -> rows: both shapes in one process, the TP=2, SP=2 and 3-D runs in
    more, two sets at a time (their imports and builds overlap on a small machine)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {
        "single": list(SHAPES),
        "tp2": ["llama-tiny"],
        "sp2": list(SHAPES),
        "tp2xpp2": ["gpt-tiny"],
    }
    with ThreadPoolExecutor(2) as pool:  # 2 sets at a time: at most 6 processes on 2 cores
        futures = {k: pool.submit(raygpt_runs, root, data_dir, k, v) for k, v in runs.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope="module")
def reference(data_dir):
    """reference(shape) -> the reference loop's rows, with each step's sample ids."""
    runs = {}

    def run(shape: str) -> list[dict]:
        if shape not in runs:
            n = len(train_rows(data_dir))
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a busy machine
            try:
                rows = train(SHAPES[shape][1], data_dir, RECIPE)
            finally:
                torch.set_num_threads(threads)
            runs[shape] = [
                {**r, "ids": step_sample_ids(r["step"], RECIPE.global_batch, n, RECIPE.seed)}
                for r in rows
            ]
        return runs[shape]

    return run


@pytest.mark.parametrize("shape", list(SHAPES))
def test_single_process_matches_the_reference(shape, raygpt, reference):
    got, want = raygpt["single"][shape], reference(shape)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["ids"] for r in got] == [r["ids"] for r in want], "another data order"
    assert [r["consumed_samples"] for r in got] == [r["consumed_samples"] for r in want]
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in want], rel=1e-12)
    losses, ref = [r["loss"] for r in got], [r["loss"] for r in want]
    print(f"{shape} single process vs reference: max relative loss difference "
          f"{max_rel(losses, ref):.2e}")  # fmt: skip
    assert losses == pytest.approx(ref, rel=1e-5, abs=0), (losses, ref)
    norms, ref_norms = [r["grad_norm"] for r in got], [r["grad_norm"] for r in want]
    assert norms == pytest.approx(ref_norms, rel=1e-4), (norms, ref_norms)
    assert ref[-1] < ref[0], "the reference must learn"


def test_tensor_parallel_gqa_rope_matches_single_process(raygpt, reference):
    got, one = raygpt["tp2"]["llama-tiny"], raygpt["single"]["llama-tiny"]
    assert [r["ids"] for r in got] == [r["ids"] for r in one]
    assert [r["consumed_samples"] for r in got] == [r["consumed_samples"] for r in one]
    losses, want = [r["loss"] for r in got], [r["loss"] for r in one]
    ref = [r["loss"] for r in reference("llama-tiny")]
    print(f"llama-tiny tp2 vs single process: max relative loss difference "
          f"{max_rel(losses, want):.2e} (vs reference {max_rel(losses, ref):.2e})")  # fmt: skip
    assert losses == pytest.approx(want, rel=1e-4, abs=0), (losses, want)
    norms, one_norms = [r["grad_norm"] for r in got], [r["grad_norm"] for r in one]
    assert norms == pytest.approx(one_norms, rel=1e-4), (norms, one_norms)  # what clipping used


@pytest.mark.parametrize("shape", list(SHAPES))
def test_sequence_parallel_matches_single_process_and_the_reference(shape, raygpt, reference):
    """Ulysses SP=2: both ranks read the same samples (each half of every sequence); the loss
    is the mean over whole sequences (learned positions offset by the slice for gpt-tiny, RoPE
    over the whole sequence and grouped-query heads split over the ranks for llama-tiny)."""
    got, one = raygpt["sp2"][shape], raygpt["single"][shape]
    assert [r["ids"] for r in got] == [r["ids"] for r in one]
    assert [r["consumed_samples"] for r in got] == [r["consumed_samples"] for r in one]
    losses, want = [r["loss"] for r in got], [r["loss"] for r in one]
    ref = [r["loss"] for r in reference(shape)]
    print(f"{shape} sp2 vs single process: max relative loss difference "
          f"{max_rel(losses, want):.2e} (vs reference {max_rel(losses, ref):.2e})")  # fmt: skip
    assert losses == pytest.approx(want, rel=1e-4, abs=0), (losses, want)
    assert losses == pytest.approx(ref, rel=1e-4, abs=0), (losses, ref)
    norms, one_norms = [r["grad_norm"] for r in got], [r["grad_norm"] for r in one]
    assert norms == pytest.approx(one_norms, rel=1e-4), (norms, one_norms)


def test_3d_tensor_and_pipeline_parallel_matches_single_process(raygpt, reference):
    """TP=2 x PP=2 (4 processes): raygpt's tensor-parallel blocks in DeepSpeed's pipeline
    stages, embedding and head tied across the stages, ZeRO-1. The 2 x 2 x 2 layout (8
    processes, with data parallelism): tests/dist/test_parity.py (drill)."""
    got, one = raygpt["tp2xpp2"]["gpt-tiny"], raygpt["single"]["gpt-tiny"]
    assert [r["ids"] for r in got] == [r["ids"] for r in one]
    assert [r["consumed_samples"] for r in got] == [r["consumed_samples"] for r in one]
    losses, want = [r["loss"] for r in got], [r["loss"] for r in one]
    ref = [r["loss"] for r in reference("gpt-tiny")]
    print(f"gpt-tiny tp2xpp2 vs single process: max relative loss difference "
          f"{max_rel(losses, want):.2e} (vs reference {max_rel(losses, ref):.2e})")  # fmt: skip
    assert losses == pytest.approx(want, rel=1e-4, abs=0), (losses, want)
    assert losses == pytest.approx(ref, rel=1e-4, abs=0), (losses, ref)
    norms, one_norms = [r["grad_norm"] for r in got], [r["grad_norm"] for r in one]
    assert norms == pytest.approx(one_norms, rel=1e-4), (norms, one_norms)
