"""Weighted mixtures of prepared datasets, each source read exactly once per its own epoch.

The mixed order is a function of (seed, global position) and a short segment table, like the
single-dataset order of data_pipeline/loader.py:

- Block rule. A segment (a stretch of global positions with one set of weights) is cut into
  blocks of B = data.mixture.block consecutive positions, counted from the segment's start.
  Every block holds exactly block_shares(weights, B)[s] slots of source s (largest remainder,
  data_pipeline/config.py), laid out in a keyed pseudo-random order: the slots
  [0]*n_0 + [1]*n_1 + ... (sources by sorted name) permuted by
  default_rng([seed, MIX_KEY, segment start, block]). O(B) work and memory per block.
- Source positions. Source s's k-th slot overall is its source position k: position p in
  block b of a segment starting at P0 with per-source counts c (positions of each source
  consumed before P0) is source position c[s] + b * n_s + (rank of p's slot among the block's
  slots of s). Source position k maps to a sample id through that source's own data order,
  sample_ids_at(k, N_s, seed_s): epoch k // N_s, so each source is read exactly once per its
  own epoch and an upsampled source wraps into its next epoch (passes = k / N_s).
- Segments. The weights change at a stage boundary (data.mixture.stages, step x
  global_batch) or on resume with another mixture. A new segment starts there with the counts
  reached at that position, computed in closed form from the previous segment (full blocks x
  shares + the slots of the partial block): nothing is replayed, so a position maps to
  (source, source position) in O(1) given the table, and no source repeats or skips a sample
  when the weights change (the counts carry over; Megatron-LM issue #457 is the opposite).
- Resume. The loader's state (checkpointed) holds the consumed position and the segments that
  started so far (start, block shares, counts at start). Resuming with the same config rebuilds
  the same table; with new weights a segment starts at the resume position. Rank r of dp_size
  takes the r-th slice of a step's global positions, so a step's samples do not depend on the
  data-parallel size.

Per-source seeds are seed_s = sha256(f"{seed}/{name}") (32 bits): a source's order depends on
its name, not on the other sources or the order they are written in.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from data_pipeline.config import DataConfig, DataError, MixtureConfig, block_shares
from data_pipeline.loader import (
    DEFAULT_ORDER,
    DistributedLoader,
    StepLoader,
    TokenShards,
    order_settings,
    sample_ids_at,  # the one import of the data order
    shard_settings,
)
from data_pipeline.manifest import Manifest
from data_pipeline.order import Order

MIX_KEY = 0x313C  # separates the block-layout stream from other uses of the seed
LAYOUT_CACHE = 32  # block layouts kept per plan (O(block) memory each)
Step = list[tuple[torch.Tensor, torch.Tensor]]


def source_seed(seed: int, name: str) -> int:
    """The data-order seed of source `name`: keyed by the run seed and the name only."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


@dataclass(frozen=True)
class Segment:
    """Global positions from `start` on mix sources by `shares` (name -> slots per block,
    summing to the block size); `counts` are the positions of each source consumed before
    `start` (sources not in shares keep theirs)."""

    start: int
    shares: dict[str, int]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def block(self) -> int:
        return sum(self.shares.values())

    @property
    def active(self) -> list[str]:
        """Sources with slots in this segment, sorted: slot value i is active[i]."""
        return sorted(n for n, k in self.shares.items() if k > 0)

    def same_mix(self, shares: dict[str, int]) -> bool:
        return {n: k for n, k in self.shares.items() if k} == {n: k for n, k in shares.items() if k}

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "shares": dict(self.shares), "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Segment:
        return cls(
            start=int(d["start"]),
            shares={str(k): int(v) for k, v in d["shares"].items()},
            counts={str(k): int(v) for k, v in d.get("counts", {}).items()},
        )


def block_layout(segment: Segment, block: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index, rank among that source's slots) of each of the block's B slots, in
    position order. Source index i is segment.active[i]."""
    active = segment.active
    shares = np.array([segment.shares[n] for n in active], dtype=np.int64)
    slots = np.repeat(np.arange(len(active), dtype=np.int64), shares)
    rng = np.random.default_rng([seed, MIX_KEY, segment.start, block])
    src = slots[rng.permutation(len(slots))]
    order = np.argsort(src, kind="stable")  # each source's slots, in position order
    first = np.concatenate([[0], np.cumsum(shares)[:-1]])
    rank = np.empty_like(src)
    rank[order] = np.arange(len(src), dtype=np.int64) - first[src[order]]
    return src, rank


def counts_at(segment: Segment, position: int, seed: int) -> dict[str, int]:
    """Each source's consumed positions at global `position` (>= segment.start), in closed
    form: full blocks x shares + the slots of the partial block before `position`."""
    j = position - segment.start
    if j < 0:
        raise ValueError(f"position {position} is before the segment start {segment.start}")
    block, offset = divmod(j, segment.block)
    counts = dict(segment.counts)
    active = segment.active
    partial = np.zeros(len(active), dtype=np.int64)
    if offset:
        src, _ = block_layout(segment, block, seed)
        partial = np.bincount(src[:offset], minlength=len(active))
    for i, name in enumerate(active):
        counts[name] = counts.get(name, 0) + block * segment.shares[name] + int(partial[i])
    return counts


class MixturePlan:
    """The segment table of a mixture: history (segments already entered, from a checkpoint)
    followed by what the config says from the resume position on.

    stages: (start position, shares) sorted by position, the first at 0 (the sources'
    weights). history None: as if mixed from position 0 by the config (no checkpoint);
    history []: nothing mixed before `resume_at` (a checkpoint of a single-dataset run): every
    source starts at its position 0 there."""

    def __init__(
        self,
        stages: list[tuple[int, dict[str, int]]],
        seed: int,
        *,
        history: Optional[list[Segment]] = None,
        resume_at: int = 0,
    ):
        self.seed = seed
        self.stages = stages
        if history is None:
            segments, resume_at = [Segment(0, self.shares_at(0))], 0
        elif not history:
            segments = [Segment(resume_at, self.shares_at(resume_at))]
        else:
            segments = list(history)
            if segments[-1].start > resume_at:
                raise DataError(
                    f"mixture state: a segment starts at {segments[-1].start}, after the "
                    f"resume position {resume_at}"
                )
        self.segments = segments
        self._add(resume_at, self.shares_at(resume_at))
        for start, shares in stages:
            if start > resume_at:
                self._add(start, shares)
        self.starts = np.array([s.start for s in self.segments], dtype=np.int64)
        self._layouts: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()  # the prefetch thread maps positions too

    def _layout(self, segment: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """block_layout of a segment's block, the last LAYOUT_CACHE of them kept (consecutive
        steps share blocks)."""
        key = (segment, block)
        with self._lock:
            if key in self._layouts:
                self._layouts.move_to_end(key)
                return self._layouts[key]
        layout = block_layout(self.segments[segment], block, self.seed)
        with self._lock:
            self._layouts[key] = layout
            while len(self._layouts) > LAYOUT_CACHE:
                self._layouts.popitem(last=False)
        return layout

    def shares_at(self, position: int) -> dict[str, int]:
        current = self.stages[0][1]
        for start, shares in self.stages:
            if start <= position:
                current = shares
        return current

    def _add(self, start: int, shares: dict[str, int]) -> None:
        last = self.segments[-1]
        if last.same_mix(shares):
            return
        counts = counts_at(last, start, self.seed)
        if last.start == start:  # replaces an empty segment (nothing was read from it)
            self.segments.pop()
            counts = dict(last.counts)
        self.segments.append(Segment(start, dict(shares), counts))

    def history(self, consumed: int) -> list[Segment]:
        """The segments entered by position `consumed` (what a checkpoint keeps)."""
        return [s for s in self.segments if s.start <= consumed]

    def locate(self, positions: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(names, source index into names, source position) of each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        names = sorted({n for s in self.segments for n in s.active})
        index = {n: i for i, n in enumerate(names)}
        src = np.empty(len(positions), dtype=np.int64)
        pos = np.empty(len(positions), dtype=np.int64)
        seg_of = np.searchsorted(self.starts, positions, side="right") - 1
        if positions.size and seg_of.min() < 0:
            raise ValueError(f"position {positions.min()} is before the first segment")
        for k in np.unique(seg_of):
            seg = self.segments[int(k)]
            where = np.nonzero(seg_of == k)[0]
            j = positions[where] - seg.start
            blocks, offsets = np.divmod(j, seg.block)
            to_name = np.array([index[n] for n in seg.active], dtype=np.int64)
            base = np.array([seg.counts.get(n, 0) for n in seg.active], dtype=np.int64)
            share = np.array([seg.shares[n] for n in seg.active], dtype=np.int64)
            for b in np.unique(blocks):
                at = where[blocks == b]
                s, r = self._layout(int(k), int(b))
                local = s[offsets[blocks == b]]
                src[at] = to_name[local]
                pos[at] = base[local] + int(b) * share[local] + r[offsets[blocks == b]]
        return names, src, pos


def plan_stages(mixture: MixtureConfig, global_batch: int) -> list[tuple[int, dict[str, int]]]:
    """The config's mixes as (start position, shares): the sources' weights from 0, each
    stage from its step x global_batch on."""
    base = {n: s.weight for n, s in mixture.sources.items()}
    out = [(0, block_shares(base, mixture.block))]
    for stage in mixture.stages:
        out.append((stage.step * global_batch, block_shares(stage.weights, mixture.block)))
    return out


def check_datasets(mixture: MixtureConfig, seq_len: int) -> dict[str, Manifest]:
    """Each source's manifest; DataError (one line) when one is missing or unprepared, or
    when the sources differ in tokenizer or seq_len, or differ from data.seq_len."""
    manifests: dict[str, Manifest] = {}
    for name in mixture.names:
        where = f"data.mixture.sources.{name}.dir"
        d = mixture.sources[name].dir
        try:
            manifests[name] = Manifest.load(d)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        for split in ("train", "val"):
            if split not in manifests[name].splits or not manifests[name].splits[split].num_samples:
                raise DataError(f"{where}: {d!r} has no {split} samples; a source needs both")
    first = mixture.names[0]
    ref = manifests[first]
    for name, m in manifests.items():
        if m.tokenizer.sha256 != ref.tokenizer.sha256:
            raise DataError(
                f"data.mixture: sources {first!r} and {name!r} have different tokenizers "
                f"(sha256 {ref.tokenizer.sha256[:12]} vs {m.tokenizer.sha256[:12]}); a mixture "
                "needs one tokenizer"
            )
        if m.seq_len != ref.seq_len:
            raise DataError(
                f"data.mixture: sources {first!r} and {name!r} have different seq_len "
                f"({ref.seq_len} vs {m.seq_len}); a mixture needs one seq_len"
            )
    if ref.seq_len != seq_len:
        raise DataError(
            f"data.seq_len ({seq_len}) differs from the mixture's prepared seq_len "
            f"({ref.seq_len}, source {first!r})"
        )
    return manifests


class MixtureLoader(StepLoader):
    """DistributedLoader's interface over a mixture: this rank's micro batches of the next
    global step, each sample from the source and at the source position the plan says.

    datasets: name -> TokenShards of the split (every source of the mixture). order: each
    source's data order (data_pipeline/order.py) for a new run; a checkpoint's order wins.
    The state (state_dict) is the consumed position, the seed, the order and the segments
    entered so far. With prefetch, the next step is assembled in the background and the row
    groups of the prefetch_steps steps after it are asked for."""

    def __init__(
        self,
        datasets: dict[str, TokenShards],
        mixture: MixtureConfig,
        *,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        seq_rank: int = 0,
        seq_size: int = 1,
        consumed_samples: int = 0,
        prefetch: bool = True,
        order: Order = DEFAULT_ORDER,
        prefetch_steps: int = 16,
    ):
        missing = sorted(set(mixture.sources) - set(datasets))
        if missing:
            raise ValueError(f"no dataset for mixture source {missing[0]!r}")
        for name, shards in datasets.items():
            if len(shards) == 0:
                raise DataError(f"mixture source {name!r}: split {shards.split!r} has no samples")
        super().__init__(
            global_batch=global_batch,
            micro_batch=micro_batch,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seq_rank=seq_rank,
            seq_size=seq_size,
            consumed_samples=consumed_samples,
            prefetch=prefetch,
            prefetch_steps=prefetch_steps,
        )
        self.datasets = datasets
        self.mixture = mixture
        self.seed = seed
        self.order = order
        self.row_len = next(iter(datasets.values())).row_len
        self.plan = MixturePlan(plan_stages(mixture, global_batch), seed, resume_at=0)

    def samples_at(self, positions: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(source name, sample id) of each global position."""
        names, src, pos = self.plan.locate(positions)
        ids = np.empty_like(pos)
        for i in np.unique(src):
            name = names[int(i)]
            if name not in self.datasets:
                raise DataError(f"mixture source {name!r} is mixed here but was not given")
            where = src == i
            n = len(self.datasets[name])
            ids[where] = sample_ids_at(
                pos[where], n, source_seed(self.seed, name), order=self.order
            )
        return [names[int(i)] for i in src], ids

    def step_samples(self, consumed: int) -> tuple[list[str], np.ndarray]:
        """This rank's (source names, sample ids), in micro-batch order, for the step that
        starts at `consumed`."""
        return self.samples_at(self._positions(consumed))

    def sample_ids_for_step(self, consumed: int) -> np.ndarray:
        return self.step_samples(consumed)[1]

    def sources_for_step(self, consumed: int) -> list[str]:
        return self.step_samples(consumed)[0]

    def source_positions(self) -> dict[str, int]:
        """Each source's consumed positions so far (its passes = positions / its samples)."""
        counts = counts_at(self.plan.segments[self._segment_index()], self._consumed, self.seed)
        return {n: counts.get(n, 0) for n in self.mixture.names}

    def passes(self) -> dict[str, float]:
        """Each source's epochs read so far (> 1: upsampled, it has wrapped)."""
        return {n: k / len(self.datasets[n]) for n, k in self.source_positions().items()}

    def metrics(self) -> dict[str, float]:
        """For metrics.jsonl: passes/<source>, the epochs of each source read so far."""
        return {f"passes/{n}": p for n, p in self.passes().items()}

    def _segment_index(self) -> int:
        return int(np.searchsorted(self.plan.starts, self._consumed, side="right")) - 1

    def _load_step(self, consumed: int) -> Step:
        names, ids = self.step_samples(consumed)
        rows = np.empty((len(ids), self.row_len), dtype=np.int32)
        by_source = np.array(names)
        for name in sorted(set(names)):
            where = np.nonzero(by_source == name)[0]
            rows[where] = self.datasets[name].get_batch(ids[where])
        return self._micro_batches(rows)

    def _prefetch_step(self, consumed: int) -> None:
        names, ids = self.step_samples(consumed)
        by_source = np.array(names)
        for name in sorted(set(names)):
            self.datasets[name].prefetch(ids[by_source == name])

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed_samples": self._consumed,
            "seed": self.seed,
            **self.order.state(),
            "mixture": {
                "segments": [s.to_dict() for s in self.plan.history(self._consumed)],
                "sizes": {n: len(d) for n, d in self.datasets.items()},
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the state's position: its segments, then this config's mix from there
        on (a new segment where it differs), in the state's order. A state without "mixture"
        (a single-dataset checkpoint) starts every source at its position 0 there, in this
        loader's order."""
        consumed = int(state["consumed_samples"])
        seed = int(state.get("seed", self.seed))
        saved = state.get("mixture")
        history = [] if saved is None else [Segment.from_dict(s) for s in saved["segments"]]
        if saved is not None:
            self._check_sizes(saved.get("sizes", {}))
            self.order = Order.from_state(state)
        self.plan = MixturePlan(
            plan_stages(self.mixture, self.global_batch), seed, history=history, resume_at=consumed
        )
        self.seed = seed
        self._restart_at(consumed)

    def _check_sizes(self, sizes: dict[str, int]) -> None:
        """A source resumed under its name must be the dataset it was (same sample count):
        its position means nothing in another one."""
        for name, n in sizes.items():
            if name in self.datasets and len(self.datasets[name]) != int(n):
                raise DataError(
                    f"data.mixture.sources.{name}: {len(self.datasets[name])} samples, but the "
                    f"checkpoint read it with {n}: a changed dataset needs a new source name"
                )


def build_loaders(
    data: DataConfig, data_dir: str, *, global_batch: int, val_batch: int, **loader_args: Any
) -> tuple[DistributedLoader | MixtureLoader, dict[str, DistributedLoader]]:
    """A worker's training loader and its validation loaders by name, in the order and read
    settings of `data`: over data.mixture, a MixtureLoader and each source's val loader;
    otherwise the DistributedLoader of data_dir's train split and {"": its val loader}. A val
    loader reads the val_batch leading samples of its split, in stored order, at every eval.
    loader_args: micro_batch, dp_rank, dp_size, seed (and seq_rank, seq_size: sequence slices)."""
    reads = shard_settings(data)

    def val_loader(directory: str) -> DistributedLoader:
        shards = TokenShards(directory, "val", **reads)
        return DistributedLoader(shards, global_batch=val_batch, shuffle=False, **loader_args)

    mixture = data.mixture
    if not mixture:
        train = DistributedLoader(
            TokenShards(data_dir, "train", **reads),
            global_batch=global_batch,
            window_offset=data.window_offset,
            **order_settings(data),
            **loader_args,
        )
        return train, {"": val_loader(data_dir)}
    train = MixtureLoader(
        {n: TokenShards(mixture.sources[n].dir, "train", **reads) for n in mixture.names},
        mixture,
        global_batch=global_batch,
        **order_settings(data),
        **loader_args,
    )
    return train, {n: val_loader(mixture.sources[n].dir) for n in mixture.names}


def close_loaders(*loaders: DistributedLoader | MixtureLoader) -> None:
    """Stops each loader's prefetch thread, then the read threads of the shards it reads."""
    for loader in loaders:
        loader.close()
        shards = loader.datasets if isinstance(loader, MixtureLoader) else {"": loader.shards}
        for s in shards.values():
            s.close()
