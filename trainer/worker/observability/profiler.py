"""torch.profiler traces of chosen training steps (trainer.profile_steps).

    profiler = StepProfiler([5, 6], run_dir / "profile", rank)
    for step in ...:
        profiler.start(step)   # before the step (data wait included)
        ...                    # the step
        profiler.step(step)    # after it: ends and writes the trace after the last chosen step

Each rank writes a Chrome trace (chrome://tracing, https://ui.perfetto.dev): rank_<r>.json
when the chosen steps are consecutive, else one rank_<r>_steps_<a>-<b>.json per run of
consecutive steps. Steps outside the list run with no profiler at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import torch


def _runs(steps: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted steps: [2, 3, 7] -> [(2, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for s in steps:
        if runs and s == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    return runs


class StepProfiler:
    """Starts torch.profiler before the first step of each run of chosen steps and writes its
    trace after the last one (or after `last_step`, where the run ends early). A step is
    profiled once: steps repeated after a rollback are not traced again."""

    def __init__(
        self,
        steps: Iterable[int],
        out_dir: Path,
        rank: int,
        *,
        last_step: Optional[int] = None,
        announce: Optional[bool] = None,
        cuda: bool = False,
    ):
        """cuda: also trace CUDA kernels (the engine is on a GPU; never decided by the host)."""
        self.cuda = cuda
        self.steps = sorted(set(steps))
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.last_step = last_step
        self.announce = rank == 0 if announce is None else announce
        self._single = len(_runs(self.steps)) <= 1
        self._done: set[int] = set()
        self._prof: Optional[torch.profiler.profile] = None
        self._span = None
        self._first = 0
        self.written: list[Path] = []

    @property
    def active(self) -> bool:
        return self._prof is not None

    def start(self, step: int) -> None:
        if step in self._done or step not in self.steps:
            return
        if self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self._prof.start()
            self._first = step
        self._span = torch.profiler.record_function(f"train_step {step}")
        self._span.__enter__()

    def step(self, step: int) -> Optional[Path]:
        """After `step`: returns the trace's path where this step ended a traced run."""
        if self._prof is None or step not in self.steps or step in self._done:
            return None
        self._done.add(step)
        if self._span is not None:
            self._span.__exit__(None, None, None)
            self._span = None
        ends = step + 1 not in self.steps or step == self.last_step
        return self._finish(step) if ends else None

    def close(self) -> Optional[Path]:
        """Writes what a still-running trace holds (the run stopped inside a traced run)."""
        if self._prof is None:
            return None
        if self._span is not None:
            self._span.__exit__(None, None, None)
            self._span = None
        return self._finish(max(self._done, default=self._first))

    def _finish(self, last: int) -> Path:
        prof, self._prof = self._prof, None
        prof.stop()
        suffix = "" if self._single else f"_steps_{self._first}-{last}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank_{self.rank}{suffix}.json"
        prof.export_chrome_trace(str(path))
        self.written.append(path)
        if self.announce:
            steps = f"step {last}" if last == self._first else f"steps {self._first}-{last}"
            print(
                f"[profile] {steps}: chrome trace per rank in {self.out_dir}/rank_<r>{suffix}.json"
            )
        return path
