"""Pins the installed Hydra's behaviour that trainer/driver/sweep/hydra_private.py relies on, on a
two-key config of its own: a Hydra upgrade that changes any of it fails here, with a message
naming the behaviour and the adapter to update.

1. run_multirun: the launcher registered as hydra/launcher=<name> is instantiated, its setup is
   handed the task function given to run_multirun (the same object: the sweep reaches its
   launcher through it) and the master config (hydra.overrides.task, hydra.sweeper), its
   launch gets the basic sweeper's grid in one batch, an exception it raises comes out of
   run_multirun as itself (SweepStopped, SweepChecked), and multirun.yaml is written to
   hydra.sweep.dir.
2. grid_jobs: the basic sweeper's order; an override Hydra cannot parse raises.
3. Optuna's sweeper (when installed) hands the same task function to the launcher and takes
   each JobReturn's return value as the trial's value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import hydra
import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher

from trainer.driver.sweep import hydra_private

ADAPTER = "trainer/driver/sweep/hydra_private.py"


@contextlib.contextmanager
def relied_on(what: str) -> Iterator[None]:
    """Fails with one clear message if Hydra no longer does `what`."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure of Hydra here is the message
        pytest.fail(changed(what, f"{type(e).__name__}: {e}"), pytrace=False)


def changed(what: str, seen: object) -> str:
    return (
        f"hydra-core {hydra.__version__} no longer {what} (seen: {seen}); {ADAPTER} relies on it "
        f"(checked with {hydra_private.CHECKED_WITH}): update the adapter, not its callers"
    )


class Stop(Exception):
    pass


class PinLauncher(Launcher):
    """Records what Hydra hands a launcher; returns each job's number as its value."""

    calls: list[tuple[str, object]] = []
    raise_in_launch = False

    def setup(self, *, hydra_context, task_function, config) -> None:
        PinLauncher.calls.append(("setup", (task_function, config)))
        self.config = config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        PinLauncher.calls.append(("launch", ([list(j) for j in job_overrides], initial_job_idx)))
        if PinLauncher.raise_in_launch:
            raise Stop("from launch")
        return [
            JobReturn(
                overrides=list(j),
                cfg=self.config,
                status=JobStatus.COMPLETED,
                _return_value=float(initial_job_idx + i),
            )
            for i, j in enumerate(job_overrides)
        ]


def task(cfg) -> None:
    raise AssertionError("never called by a launcher that runs jobs elsewhere")


@pytest.fixture
def conf(tmp_path) -> Path:
    d = tmp_path / "conf"
    d.mkdir()
    (d / "config.yaml").write_text("a: 1\nb: x\n")
    PinLauncher.calls, PinLauncher.raise_in_launch = [], False
    with relied_on("registers a launcher plugin under hydra_plugins.* (Plugins.register)"):
        target = hydra_private.register_launcher(PinLauncher, "raygpt_pin")
        assert hydra_private.register_launcher(PinLauncher, "raygpt_pin") == target
    return d


def multirun(conf: Path, overrides: list[str]) -> None:
    sweep_dir = conf.parent / "multirun"  # made beforehand, as run_sweep makes its own
    sweep_dir.mkdir(exist_ok=True)
    own = ["hydra/launcher=raygpt_pin", f"hydra.sweep.dir={sweep_dir}"]
    hydra_private.run_multirun(str(conf), "config", [*overrides, *own], task)


def test_multirun_hands_the_task_function_and_the_grid_to_the_launcher(conf):
    with relied_on("runs a multirun in-process (hydra._internal Hydra, ConfigLoaderImpl)"):
        multirun(conf, ["a=1,2", "b=x,y"])
    kinds = [k for k, _ in PinLauncher.calls]
    assert kinds == ["setup", "launch"], changed("calls setup once, then launch", kinds)
    task_function, config = PinLauncher.calls[0][1]
    assert task_function is task, changed(
        "hands the launcher's setup the task function given to multirun", task_function
    )
    task_ov = list(config.hydra.overrides.task)
    assert task_ov == ["a=1,2", "b=x,y"], changed(
        "gives the launcher the command line's task overrides in hydra.overrides.task", task_ov
    )
    target = config.hydra.sweeper._target_
    assert "basicsweeper" in target.lower(), changed(
        "names its basic sweeper 'BasicSweeper'", target
    )
    batches = PinLauncher.calls[1][1]
    want = ([["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]], 0)
    assert batches == want, changed("launches a grid as one batch in this order", batches)
    assert (conf.parent / "multirun" / "multirun.yaml").is_file(), changed(
        "writes multirun.yaml into hydra.sweep.dir", sorted((conf.parent / "multirun").iterdir())
    )


def test_an_exception_of_the_launcher_comes_out_of_multirun_as_itself(conf):
    PinLauncher.raise_in_launch = True
    try:
        multirun(conf, ["a=1,2"])
    except Stop:
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(changed("lets the launcher's exception through", repr(e)), pytrace=False)
    pytest.fail(changed("lets the launcher's exception through", "no exception"), pytrace=False)


def test_grid_jobs_in_the_basic_sweepers_order():
    with relied_on("expands a grid with BasicSweeper.split_arguments"):
        jobs = hydra_private.grid_jobs(["a=1,2", "b=x,y", "c=3"])
    want = [
        ["a=1", "b=x", "c=3"],
        ["a=1", "b=y", "c=3"],
        ["a=2", "b=x", "c=3"],
        ["a=2", "b=y", "c=3"],
    ]
    assert jobs == want, changed("expands a grid in this order", jobs)
    assert hydra_private.grid_jobs(["m=choice(p,q)"]) == [["m=p"], ["m=q"]]
    with pytest.raises(hydra.errors.HydraException):
        hydra_private.grid_jobs(["a=[1,"])


def test_optuna_hands_the_same_task_function_and_takes_the_return_values(conf):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    optuna = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2"]
    with relied_on("runs Optuna's sweeper through a registered launcher"):
        multirun(conf, [*optuna, "hydra.sweeper.sampler.seed=1", "a=interval(0,1)"])
    kinds = [k for k, _ in PinLauncher.calls]
    assert kinds == ["setup", "launch"], changed("Optuna: one setup, one batch of 2", kinds)
    assert PinLauncher.calls[0][1][0] is task, changed(
        "Optuna: hands the launcher the task function given to multirun", PinLauncher.calls[0][1]
    )
    jobs, first = PinLauncher.calls[1][1]
    assert first == 0 and len(jobs) == 2, changed("Optuna: asks for n_jobs trials", jobs)
    results = conf.parent / "multirun" / "optimization_results.yaml"
    assert "best_value: 0.0" in results.read_text(), changed(
        "Optuna: records the launcher's return values", results.read_text()
    )
