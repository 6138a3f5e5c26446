"""Weighted mixtures (data_pipeline/mixture.py) on small real Parquet datasets: the block rule,
exactly once per source across random stops, resumes, DP sizes 1 -> 2 -> 1 and changed weights,
and the bad inputs of data.mixture (one line each)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import DataConfig, DataError, MixtureConfig, block_shares
from data_pipeline.loader import TokenShards
from data_pipeline.manifest import MANIFEST_VERSION, Manifest, ShardInfo, SplitInfo, TokenizerInfo
from data_pipeline.mixture import MixtureLoader, check_datasets
from data_pipeline.order import BLOCKS, Order

SEQ_LEN = 4
ROW = SEQ_LEN + 1
TAG = 10_000  # first token of a row = source tag * TAG + sample id
SIZES = {"a": 37, "b": 23, "c": 11}  # train samples per source: c wraps many times
TAGS = {"a": 1, "b": 2, "c": 3}


def write_source(
    root: Path,
    tag: int,
    rows: int,
    *,
    seq_len: int = SEQ_LEN,
    sha: str = "ab" * 32,
    vocab: int = TAG * 4,
) -> str:
    """A prepared dataset: train and val splits (val: 5 rows) in shards of at most 10 rows."""
    root.mkdir(parents=True, exist_ok=True)
    row_len = seq_len + 1
    splits = {}
    for split, n in (("train", rows), ("val", 5)):
        shards = []
        for k, first in enumerate(range(0, n, 10)):
            ids = np.arange(first, min(first + 10, n))
            values = np.repeat((tag * TAG + ids).astype(np.int32), row_len)  # rows of the id
            col = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.int32()), row_len)
            name = f"{split}-{k:03d}.parquet"
            pq.write_table(pa.table({"tokens": col}), root / name)
            shards.append(ShardInfo(file=name, rows=len(ids)))
        splits[split] = SplitInfo(shards=shards, num_samples=n, num_tokens=n * row_len)
    Manifest(
        version=MANIFEST_VERSION,
        name=root.name,
        tokenizer=TokenizerInfo(file="tokenizer.json", sha256=sha, vocab_size=vocab, eos_id=0),
        seq_len=seq_len,
        splits=splits,
        sources=[root.name],
        num_documents={"train": rows, "val": 5},
        settings={},
        fingerprint="",
        created="2024-01-01T00:00:00+00:00",
    ).save(root)
    return str(root)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("mix")
    return {n: write_source(base / n, TAGS[n], SIZES[n]) for n in SIZES}


@pytest.fixture(scope="module")
def train(dirs: dict[str, str]) -> dict[str, TokenShards]:
    return {n: TokenShards(d, "train") for n, d in dirs.items()}


# Three stages (the sources' weights from step 0, then steps 7 and 15), block 10: per block
# a/b/c get 5/3/2, then 2/2/6, then 0/8/2 slots (worked out by hand from the weights).
def mixture(dirs: dict[str, str], **changes) -> MixtureConfig:
    values = {
        "sources": {n: {"dir": dirs[n], "weight": w} for n, w in (("a", 5), ("b", 3), ("c", 2))},
        "stages": [
            {"step": 7, "weights": {"a": 0.1, "b": 0.1, "c": 0.3}},
            {"step": 15, "weights": {"a": 0, "b": 4, "c": 1}},
        ],
        "block": 10,
    }
    values.update(changes)
    return MixtureConfig.from_dict(values)


GB, MB = 8, 2  # global batch 8: dp 1 -> 4 micro batches, dp 2 -> 2 each; blocks straddle steps
STEPS = 24


def loaders(train, mix, dp_size: int, state=None, **kwargs) -> list[MixtureLoader]:
    out = []
    for rank in range(dp_size):
        loader = MixtureLoader(
            train,
            mix,
            global_batch=GB,
            micro_batch=MB,
            dp_rank=rank,
            dp_size=dp_size,
            seed=7,
            **{"prefetch_steps": 2, **kwargs},
        )
        if state is not None:
            loader.load_state_dict(state)
        out.append(loader)
    return out


def decode(step) -> list[tuple[str, int]]:
    """(source, sample id) of each sample of a rank's step, from the token values (every token
    of a row is its id, so inputs and targets are checked whole)."""
    by_tag = {t: n for n, t in TAGS.items()}
    out = []
    for inputs, targets in step:
        for x, y in zip(inputs, targets):
            first = int(x[0])
            assert (x == first).all() and (y == first).all(), "a row mixed up"
            out.append((by_tag[first // TAG], first % TAG))
    return out


def run_steps(group: list[MixtureLoader], n: int) -> list[list[tuple[str, int]]]:
    """n global steps: per step the union over ranks in rank order (= position order); checks
    the audit (step_samples) names what was read."""
    steps = []
    for _ in range(n):
        union = []
        for loader in group:
            names, ids = loader.step_samples(loader.consumed_samples)
            got = decode(loader.next_step())
            assert got == list(zip(names, [int(i) for i in ids]))
            union += got
        steps.append(union)
    states = [loader.state_dict() for loader in group]
    assert all(s == states[0] for s in states), "ranks disagree on the loader state"
    for loader in group:
        loader.close()
    return steps


def per_source(steps: list[list[tuple[str, int]]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {n: [] for n in SIZES}
    for step in steps:
        for name, i in step:
            out[name].append(i)
    return out


def assert_exactly_once(streams: dict[str, list[int]]) -> None:
    """Each source's samples, in the order read, are whole permutations of its ids per epoch
    (and the last, partial epoch holds no sample twice)."""
    for name, ids in streams.items():
        n = SIZES[name]
        for start in range(0, len(ids), n):
            epoch = ids[start : start + n]
            assert len(set(epoch)) == len(epoch), f"{name}: a sample twice in one epoch"
            assert set(epoch) <= set(range(n))
            if len(epoch) == n:
                assert sorted(epoch) == list(range(n)), f"{name}: epoch incomplete"


def assert_prefixes(a: dict[str, list[int]], b: dict[str, list[int]]) -> None:
    """Each source's stream in one run is a prefix of its stream in the other: the same
    per-source order, continued where it was, whatever the mix around it."""
    for name in SIZES:
        k = min(len(a[name]), len(b[name]))
        assert a[name][:k] == b[name][:k], f"{name}: another per-source order"


@pytest.fixture(scope="module")
def reference(train, dirs) -> list[list[tuple[str, int]]]:
    return run_steps(loaders(train, mixture(dirs), 1), STEPS)


# ---------------------------------------------------------------------------- the block rule


@pytest.mark.parametrize(
    "weights, block, shares",
    [
        ({"a": 5, "b": 3, "c": 2}, 10, {"a": 5, "b": 3, "c": 2}),
        ({"a": 0.7, "b": 0.3}, 1000, {"a": 700, "b": 300}),
        # thirds of 10: 3.33 each, one left over; ties go to the name sorted first
        ({"z": 1, "y": 1, "x": 1}, 10, {"x": 4, "y": 3, "z": 3}),
        # largest remainder first: 0.45 x 10 = 4.5, 0.35 -> 3.5, 0.2 -> 2.0: a then b? 4+3+2 =
        # 9, one left: the remainders .5 and .5 tie -> 'a'
        ({"a": 0.45, "b": 0.35, "c": 0.2}, 10, {"a": 5, "b": 3, "c": 2}),
        ({"a": 0.46, "b": 0.34, "c": 0.2}, 10, {"a": 5, "b": 3, "c": 2}),
        ({"a": 0.44, "b": 0.36, "c": 0.2}, 10, {"a": 4, "b": 4, "c": 2}),
        ({"a": 1, "b": 0}, 7, {"a": 7, "b": 0}),
        ({"a": 2, "b": 1}, 1, {"a": 1, "b": 0}),
    ],
)
def test_block_shares_largest_remainder(weights, block, shares) -> None:
    assert block_shares(weights, block) == shares


def test_every_block_holds_its_shares(reference) -> None:
    """Per segment (from its start), each full block of 10 positions has the hand-computed
    counts: 5/3/2 until step 7 (position 56), 2/2/6 until step 15 (120), then 0/8/2."""
    flat = [name for step in reference for name, _ in step]
    segments = [(0, 56, (5, 3, 2)), (56, 120, (2, 2, 6)), (120, len(flat), (0, 8, 2))]
    for start, end, want in segments:
        blocks = 0
        for b in range(start, end - 9, 10):
            c = Counter(flat[b : b + 10])
            assert (c["a"], c["b"], c["c"]) == want, (b, c)
            blocks += 1
        assert blocks >= 5
    # the slots inside blocks are not in source order (a keyed layout)
    assert flat[:10] != sorted(flat[:10])


def test_uninterrupted_run_reads_each_source_once_per_epoch(train, dirs, reference) -> None:
    streams = per_source(reference)
    assert_exactly_once(streams)
    # a: 5*5 + 2*... counts from the shares: positions [0,56): 5 full blocks + 6 of block 5
    counts = {n: len(s) for n, s in streams.items()}
    assert sum(counts.values()) == STEPS * GB
    assert counts["c"] > 2 * SIZES["c"], "c is upsampled and wraps"
    loader = loaders(train, mixture(dirs), 1)[0]
    loader.load_state_dict({**loader.state_dict(), "consumed_samples": 0})
    for _ in range(STEPS):
        loader.next_step()
    assert loader.source_positions() == counts
    assert loader.passes() == pytest.approx({n: counts[n] / SIZES[n] for n in SIZES})
    loader.close()


# ---------------------------------------------------------------------------- the property


@pytest.mark.parametrize("trial", range(6))
def test_random_stops_resumes_and_dp_sizes_equal_uninterrupted(train, dirs, reference, trial):
    """3 sources, 3 stages, random stop steps, DP sizes 1 -> 2 -> 1 -> 2 ...: the (source, id)
    sequence of every step equals the uninterrupted run's."""
    rng = random.Random(1000 + trial)
    stops = sorted(rng.sample(range(1, STEPS), rng.randint(2, 5)))
    steps, state, at = [], None, 0
    for k, stop in enumerate([*stops, STEPS]):
        dp = (1, 2)[k % 2]
        group = loaders(train, mixture(dirs), dp, state)
        assert group[0].consumed_samples == at * GB
        steps += run_steps(group, stop - at)
        state, at = group[0].state_dict(), stop
    assert steps == reference


@pytest.fixture(scope="module")
def streams(train, dirs) -> dict[str, list[int]]:
    """Each source's own order, read alone (a one-source mixture) for STEPS steps."""
    out = {}
    for name in SIZES:
        alone = MixtureConfig.from_dict({"sources": {name: {"dir": dirs[name]}}, "block": 3})
        out[name] = per_source(run_steps(loaders(train, alone, 1), STEPS))[name]
    return out


def random_mixture(dirs, rng: random.Random, after: int) -> MixtureConfig:
    """Random weights (zeros included, never all), block and up to 2 stages after `after`."""

    def weights() -> dict[str, int]:
        w = {n: rng.choice([0, 0, 1, 2, 5]) for n in SIZES}
        return w if any(w.values()) else {**w, "b": 1}

    while True:
        steps = sorted(rng.sample(range(after + 1, STEPS + 2), rng.randint(0, 2)))
        try:
            return MixtureConfig.from_dict(
                {
                    "sources": {n: {"dir": dirs[n], "weight": w} for n, w in weights().items()},
                    "stages": [{"step": k, "weights": weights()} for k in steps],
                    "block": rng.randint(3, 12),
                }
            )
        except DataError:  # a share that rounds to 0 slots in this block: draw again
            continue


@pytest.mark.parametrize("trial", range(8))
def test_random_new_mixtures_on_resume_continue_every_source(train, dirs, streams, trial):
    """Random stops; at each, a random new mixture (weights, block, stages) on 1 or 2 ranks:
    every source's samples are a prefix of its own order (nothing repeated, nothing skipped)
    and the passes the loader reports match what was read."""
    rng = random.Random(2000 + trial)
    stops = sorted(rng.sample(range(1, STEPS), rng.randint(1, 4)))
    steps, state, at = [], None, 0
    for k, stop in enumerate([*stops, STEPS]):
        group = loaders(train, random_mixture(dirs, rng, at), (1, 2)[k % 2], state)
        steps += run_steps(group, stop - at)
        state, at = group[0].state_dict(), stop
    got = per_source(steps)
    for name in SIZES:
        assert got[name] == streams[name][: len(got[name])], name
    assert_exactly_once(got)
    last = loaders(train, mixture(dirs), 1, state)[0]
    assert last.source_positions() == {n: len(got[n]) for n in SIZES}
    last.close()


def test_new_weights_on_resume_neither_repeat_nor_skip(train, dirs, reference) -> None:
    """Stop at step 10 (inside stage 2), resume on 2 ranks with other weights and stages: each
    source continues its own order where it was."""
    first = loaders(train, mixture(dirs), 1)
    before = run_steps(first, 10)
    assert before == reference[:10]
    state = first[0].state_dict()
    other = mixture(
        dirs,
        sources={n: {"dir": dirs[n], "weight": w} for n, w in (("a", 1), ("b", 1), ("c", 1))},
        stages=[{"step": 18, "weights": {"a": 3, "b": 0, "c": 1}}],
        block=6,
    )
    after = run_steps(loaders(train, other, 2, state), 14)
    both = per_source(before + after)
    assert_exactly_once(both)
    assert_prefixes(both, per_source(reference))
    # the new mix is in effect from step 10 on: a third each per block of 6, from position 80
    flat = [name for step in after for name, _ in step]
    for b in range(0, 8 * GB - 5, 6):
        assert Counter(flat[b : b + 6]) == {"a": 2, "b": 2, "c": 2}


def test_new_weights_on_resume_equal_a_stage_at_that_step(train, dirs) -> None:
    """Resuming at step 10 with a mix that adds a stage at step 10 reads exactly what a run
    with that stage from the start reads (the change is a segment at the resume position)."""
    staged = mixture(
        dirs,
        stages=[
            {"step": 7, "weights": {"a": 0.1, "b": 0.1, "c": 0.3}},
            {"step": 10, "weights": {"a": 1, "b": 1, "c": 1}},
        ],
    )
    first = loaders(train, mixture(dirs), 2)
    before = run_steps(first, 10)
    after = run_steps(loaders(train, staged, 1, first[0].state_dict()), 8)
    assert before + after == run_steps(loaders(train, staged, 1), 18)


def test_changed_weights_resumed_twice_at_other_dp_sizes(train, dirs) -> None:
    """Weights changed at two resumes (1 -> 2 -> 1 ranks), a source dropped and brought back:
    its stream continues, nothing repeated or skipped."""
    mixes = [
        mixture(dirs, stages=[]),
        mixture(
            dirs,
            sources={n: {"dir": dirs[n], "weight": w} for n, w in (("a", 0), ("b", 1), ("c", 1))},
            stages=[],
        ),  # fmt: skip
        mixture(dirs, stages=[], block=7),
    ]
    steps, state = [], None
    for k, (mix, n) in enumerate(zip(mixes, (5, 6, 7))):
        group = loaders(train, mix, (1, 2, 1)[k], state)
        steps += run_steps(group, n)
        state = group[0].state_dict()
    streams = per_source(steps)
    assert_exactly_once(streams)
    assert_prefixes(streams, per_source(run_steps(loaders(train, mixes[0], 1), 40)))
    assert len(state["mixture"]["segments"]) == 3


def test_single_dataset_checkpoint_starts_every_source_at_zero(train, dirs, reference) -> None:
    group = loaders(train, mixture(dirs, stages=[]), 1, {"consumed_samples": 40, "seed": 7})
    streams = per_source(run_steps(group, 6))
    assert_prefixes(streams, per_source(reference))
    assert all(s for s in streams.values())


def test_resume_keeps_the_checkpoints_data_order(train, dirs) -> None:
    """Each source's order is the loader's (data_pipeline/order.py); the state records it and
    a resume keeps it, whatever order the resuming loader was built with."""
    small = Order(BLOCKS, chunk=4, window=2)
    mix = mixture(dirs)
    whole = run_steps(loaders(train, mix, 1, order=small), 12)
    assert whole != run_steps(loaders(train, mix, 1), 12), "the order is not in effect"
    first = loaders(train, mix, 2, order=small)
    before = run_steps(first, 5)
    state = first[0].state_dict()
    assert (state["order"], state["order_chunk"], state["order_window"]) == (BLOCKS, 4, 2)
    assert before + run_steps(loaders(train, mix, 1, state), 7) == whole


def test_a_source_resumed_with_another_dataset_is_refused(train, dirs, tmp_path) -> None:
    state = loaders(train, mixture(dirs), 1)[0].state_dict()
    other = dict(train, c=TokenShards(write_source(tmp_path / "c2", 3, 12), "train"))
    with pytest.raises(DataError, match=r"sources\.c: 12 samples, but the checkpoint read it"):
        loaders(other, mixture(dirs), 1, state)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "mix, message",
    [
        ({"sources": {"a": {"dir": "/x", "weight": -1}}}, r"weight of 'a' is -1; .* >= 0"),
        (
            {"sources": {"a": {"dir": "/x", "weight": 0}, "b": {"dir": "/y", "weight": 0}}},
            r"weights sum to 0; they must sum to > 0",
        ),  # fmt: skip
        (
            {
                "sources": {"a": {"dir": "/x"}},
                "stages": [{"step": 5, "weights": {"a": 1}}, {"step": 5, "weights": {"a": 1}}],
            },
            r"stages\[1\]\.step: 5 is not after 5",
        ),  # fmt: skip
        (
            {
                "sources": {"a": {"dir": "/x"}},
                "stages": [{"step": 9, "weights": {"a": 1}}, {"step": 3, "weights": {"a": 1}}],
            },
            r"stages\[1\]\.step: 3 is not after 9 .* must increase",
        ),  # fmt: skip
        (
            {"sources": {"a": {"dir": "/x"}}, "stages": [{"step": 0, "weights": {"a": 1}}]},
            r"stages\[0\]\.step: 0 is not after 0",
        ),  # fmt: skip
        (
            {"sources": {"a": {"dir": "/x"}}, "stages": [{"step": 3, "weights": {"a": 1, "q": 1}}]},
            r"stages\[0\]\.weights: unknown source 'q' \(sources: a\)",
        ),  # fmt: skip
        (
            {
                "sources": {"a": {"dir": "/x"}, "b": {"dir": "/y"}},
                "stages": [{"step": 3, "weights": {"a": 1}}],
            },
            r"no weight for source 'b'",
        ),  # fmt: skip
        (
            {"sources": {"a": {"dir": "/x", "weight": 1}, "b": {"dir": "/y", "weight": 1e-4}}},
            r"source 'b' \(weight 0.0001\) gets 0 of the 1000 samples of a block",
        ),  # fmt: skip
        ({"sources": {"a": {"dir": ""}}}, r"sources\.a\.dir: must be a non-empty"),
        ({"sources": {"a/b": {"dir": "/x"}}}, r"name 'a/b' must be letters"),
        ({"sources": {"a": {"dir": "/x", "wieght": 1}}}, r"unknown key\(s\) wieght"),
        ({"sources": {"a": {"dir": "/x"}}, "block": 0}, r"block: must be an integer >= 1"),
        ({"stages": [{"step": 3, "weights": {}}]}, r"stages: given without .*sources"),
    ],
)
def test_bad_mixture_settings_one_line(mix, message) -> None:
    with pytest.raises(DataError, match=message) as e:
        DataConfig.from_dict({"mixture": mix})
    assert "\n" not in str(e.value)


def test_random_windows_with_a_mixture_are_refused() -> None:
    with pytest.raises(DataError, match="window_offset='random' with data.mixture"):
        DataConfig.from_dict(
            {"window_offset": "random", "mixture": {"sources": {"a": {"dir": "x"}}}}
        )


def test_datasets_checked_in_one_line(dirs, tmp_path) -> None:
    ok = {n: {"dir": d} for n, d in dirs.items()}
    assert sorted(check_datasets(MixtureConfig(sources=ok), SEQ_LEN)) == ["a", "b", "c"]
    cases = [
        ({"z": {"dir": write_source(tmp_path / "t", 4, 9, sha="cd" * 32)}},
         r"sources 'a' and 'z' have different tokenizers \(sha256 abababababab vs cdcdcdcdcdcd\)"),
        ({"z": {"dir": write_source(tmp_path / "s", 4, 9, seq_len=6)}},
         r"sources 'a' and 'z' have different seq_len \(4 vs 6\)"),
        ({"z": {"dir": str(tmp_path / "nothing")}},
         r"sources\.z\.dir: no manifest\.json in .*nothing.* \(prepare it first"),
    ]  # fmt: skip
    for extra, message in cases:
        with pytest.raises(DataError, match=message) as e:
            check_datasets(MixtureConfig(sources={**ok, **extra}), SEQ_LEN)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"data.seq_len \(8\) differs from the mixture's"):
        check_datasets(MixtureConfig(sources=ok), 8)


# ---------------------------------------------------------------------------- the command line


@pytest.fixture
def no_ray(monkeypatch):
    """A bad input that got past the edge would start Ray (or train): fail instead."""
    import ray

    import cluster.launch

    def refuse(*args, **kwargs):
        raise AssertionError("training would start: the bad input was not stopped at the edge")

    monkeypatch.setattr(cluster.launch, "connected", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def sources_arg(entries: dict[str, tuple[str, float]]) -> str:
    inner = ", ".join(f"{n}: {{dir: {d}, weight: {w}}}" for n, (d, w) in entries.items())
    return f"data.mixture.sources={{{inner}}}"


def test_train_refuses_bad_mixtures_in_one_line(tmp_path, capsys, no_ray) -> None:
    """python -m trainer.train: exit 2, one error line naming the value and the rule, nothing
    written (run.root unchanged, no data prepared), Ray never started."""
    from trainer.train import main

    a = write_source(tmp_path / "a", 1, 12, vocab=512)
    b = write_source(tmp_path / "b", 2, 12, vocab=512)
    other_tok = write_source(tmp_path / "tok", 3, 12, vocab=512, sha="cd" * 32)
    other_len = write_source(tmp_path / "len", 3, 12, vocab=512, seq_len=6)
    unprepared = tmp_path / "unprepared"
    unprepared.mkdir()
    (unprepared / "train-000.parquet").write_bytes(b"PAR1")
    runs = tmp_path / "runs"
    (runs / "old").mkdir(parents=True)
    (runs / "old" / "metrics.jsonl").write_text('{"step": 1}\n')
    base = ["+experiment=smoke", "precision=fp32", f"run.root={runs}", "run.name=old",
            "data.seq_len=4", "trainer.eval_batches=1", f"data.out_dir={tmp_path / 'out'}",
            "cluster.num_workers=1"]  # fmt: skip
    stage = (
        "data.mixture.stages=[{step: 4, weights: {a: 1, b: 1}}, {step: 2, weights: {a: 1, b: 0}}]"
    )
    cases = [
        ([sources_arg({"a": (a, 1), "t": (other_tok, 1)})], "different tokenizers"),
        ([sources_arg({"a": (a, 1), "s": (other_len, 1)})], r"different seq_len \(4 vs 6\)"),
        ([sources_arg({"a": (a, 1), "m": (tmp_path / "missing", 1)})],
         r"sources\.m\.dir: no manifest\.json in .*missing.* \(prepare it first"),
        ([sources_arg({"a": (a, 1), "u": (unprepared, 1)})],
         r"sources\.u\.dir: no manifest\.json in .*unprepared"),
        ([sources_arg({"a": (a, 1), "b": (b, -0.5)})], r"weight of 'b' is -0\.5; weights must be >= 0"),
        ([sources_arg({"a": (a, 0), "b": (b, 0)})], r"weights sum to 0"),
        ([sources_arg({"a": (a, 1), "b": (b, 1)}), stage], r"stages\[1\]\.step: 2 is not after 4"),
        ([sources_arg({"a": (a, 1), "b": (b, 1)}),
          "data.mixture.stages=[{step: 4, weights: {a: 1, b: 1, web: 2}}]"],
         r"stages\[0\]\.weights: unknown source 'web' \(sources: a, b\)"),
    ]  # fmt: skip
    before = tree(tmp_path)
    for extra, message in cases:
        capsys.readouterr()
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert re.search(message, errors[0]), (message, errors[0])
        assert tree(tmp_path) == before, "something was written"
    # and a good mixture passes every check before Ray
    from trainer.config import load_config
    from trainer.driver import preflight

    cfg = load_config([*base, sources_arg({"a": (a, 2), "b": (b, 1)})])
    assert sorted(preflight.check_mixture(cfg)) == ["a", "b"]


class FakeRun:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log(self, values: dict, step: int) -> None:
        self.logged.append((values, step))


def test_eval_rows_and_wandb_carry_val_loss_per_source(tmp_path, capsys) -> None:
    from trainer.config import LoggingConfig
    from trainer.worker.observability.logger import RunLogger

    logger = RunLogger(tmp_path, LoggingConfig(mode="disabled"), run_name="m", group=None,
                       wandb_id="x", config={}, max_steps=3, start_step=0)  # fmt: skip
    logger.wandb = FakeRun()  # W&B itself is not under test: what raygpt hands it is
    logger.log_eval(3, 2.5, {"web": 2.0, "code": 3.0})
    logger.log_eval(4, 2.0)
    rows = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert rows[0]["val_loss/web"] == 2.0 and rows[0]["val_loss/code"] == 3.0
    assert rows[0]["val_loss"] == 2.5 and not any("/" in k for k in rows[1])
    values, step = logger.wandb.logged[0]
    assert step == 3 and values["val/loss/web"] == 2.0 and values["val/loss/code"] == 3.0
    assert "val_loss/web 2.0000" in capsys.readouterr().out
    logger.wandb = None
    logger.close()


def test_prepare_refuses_a_mixture_in_one_line(tmp_path, capsys, no_ray) -> None:
    """python -m data_pipeline.prepare with data.mixture set would otherwise prepare
    data.sources and ignore the mixture: exit 2, one error line, nothing written."""
    from data_pipeline.prepare import main

    a = write_source(tmp_path / "a", 1, 12, vocab=512)
    out = tmp_path / "out"
    code = main(["+experiment=smoke", f"data.out_dir={out}", sources_arg({"a": (a, 1)})])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: data.mixture: a mixture is made of datasets prepared one")
    assert not out.exists()
