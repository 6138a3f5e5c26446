"""Sweeps without Ray: bad input is refused in one line before any job starts (nothing of an
earlier sweep touched), the definition's fingerprint, job naming and statuses, the sweep
directory on local disk and on S3, and the comparison it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from procs import tree_digest as digest

from cluster.config import ClusterConfig
from trainer.config import ConfigError
from trainer.driver.sweep import plan as sw
from trainer.driver.sweep.record import SweepRecord
from trainer.driver.sweep.report import write_report
from trainer.driver.sweep.runner import SweepRunner, classify
from trainer.train import main

SMOKE = ["+experiment=smoke", "logging.mode=disabled"]


def run_main(args: list[str], capsys) -> tuple[int, list[str]]:
    rc = main(["-m", *args])
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.startswith("error:")]


def make_plan(root: str, overrides: list[str], **kw) -> sw.SweepPlan:
    args = dict(
        root=root,
        sweep_name=None,
        run_name="sw",
        run_group=None,
        max_parallel=2,
        cluster=ClusterConfig(),
        overrides=overrides,
        sweeper={"_target_": "basic", "max_batch_size": None, "params": None},
    )
    args.update(kw)
    return sw.SweepPlan.create(**args)


def make_sweep(root: str, overrides: list[str], **kw) -> SweepRecord:
    """The sweep's record as an invocation with these overrides reads it from its directory."""
    return SweepRecord.load(make_plan(root, overrides, **kw))


@pytest.fixture
def earlier_sweep(tmp_path) -> Path:
    """A sweep directory from an earlier invocation of `optim.lr=1e-3,2e-3` (one job done)."""
    overrides = [*SMOKE, "run.name=sw", f"run.root={tmp_path}", "optim.lr=1e-3,2e-3"]
    s = make_sweep(str(tmp_path), overrides)
    s.jobs = {j.num: j for j in s.make_jobs([["optim.lr=1e-3"], ["optim.lr=2e-3"]], 0)}
    s.jobs[0].status = "finished"
    s.created_at = sw.utc_now()
    s.save()
    return tmp_path / "sweep-sw"


@pytest.mark.parametrize(
    "args, message",
    [
        (["sweep.max_parallel=0", "optim.lr=1e-3,2e-3"], "sweep: max_parallel (0) must be >= 1"),
        (["model.n_head=4,3"], "sweep job 1 (sw-1: model.n_head=3): model:"),
        (["model=gpt-tiny,nope"], "sweep job 1 (model=nope): model=nope does not exist"),
        (["sweep.max_parallel=1,2"], "sweep.max_parallel (1) differs from the sweep's (2)"),
        (["cluster.cpus_per_worker=1,1000"], "(sw-1: cluster.cpus_per_worker=1000): cluster."),
        (["hydra/launcher=basic"], "raygpt sweeps run through their own launcher"),
        (["sweep.name=a/b"], "sweep: name ('a/b') must be letters"),
    ],
    ids=[
        "max_parallel",
        "one_bad_job",
        "missing_option",
        "swept_sweep_key",
        "too_big",
        "launcher",
        "name",
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(args, message, tmp_path, capsys):
    rc, errors = run_main([*SMOKE, "run.name=sw", f"run.root={tmp_path}", *args], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert message in errors[0], errors[0]
    assert not any(tmp_path.iterdir())


def test_other_definition_refused_and_earlier_sweep_untouched(earlier_sweep, capsys):
    before = digest(earlier_sweep)
    root = earlier_sweep.parent
    rc, errors = run_main([*SMOKE, "run.name=sw", f"run.root={root}", "optim.lr=5e-3,6e-3"], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert "sweep 'sweep-sw'" in errors[0] and "was made by another sweep definition" in errors[0]
    assert "then optim.lr=1e-3,2e-3; now optim.lr=5e-3,6e-3" in errors[0]
    assert digest(earlier_sweep) == before


def test_directory_that_is_not_a_sweep_refused(tmp_path, capsys):
    (tmp_path / "sweep-sw" / "checkpoint_00000002").mkdir(parents=True)
    rc, errors = run_main(
        [*SMOKE, "run.name=sw", f"run.root={tmp_path}", "optim.lr=1e-3,2e-3"], capsys
    )
    assert rc == 2 and "is not a sweep directory" in errors[0]


def test_same_definition_keeps_stored_jobs_other_max_parallel_is_the_same_sweep(earlier_sweep):
    root = str(earlier_sweep.parent)
    overrides = [*SMOKE, "run.name=sw", f"run.root={root}", "optim.lr=1e-3,2e-3"]
    s = make_sweep(root, [*overrides, "sweep.max_parallel=1"], max_parallel=1)
    jobs = s.make_jobs([["optim.lr=1e-3"], ["optim.lr=2e-3"]], 0)
    assert [(j.name, j.status) for j in jobs] == [("sw-0", "finished"), ("sw-1", "pending")]
    # the runtime settings of the invocation that ran a job are no part of it
    s.stored[1].overrides = ["optim.lr=2e-3", "sweep.max_parallel=2", "cluster.address=auto"]
    now = ["optim.lr=2e-3", "sweep.max_parallel=1", "cluster.address='10.0.0.1:6379'"]
    job = s.make_jobs([["optim.lr=1e-3"], now], 0)[1]
    assert (job.name, job.status, job.overrides) == ("sw-1", "pending", now)
    # a sweeper that asks for other values under the same numbers is refused
    with pytest.raises(ConfigError, match=r"sweep job 1 \(sw-1\): the sweeper now asks for"):
        s.make_jobs([["optim.lr=1e-3"], ["optim.lr=9e-3"]], 0)


def test_fingerprint_names_and_labels():
    d1 = sw.definition(["a=1,2", "sweep.max_parallel=4"], {"_target_": "x", "n_jobs": 2})
    d2 = sw.definition(["a=1,2"], {"_target_": "x", "n_jobs": 8})
    assert sw.fingerprint(d1) == sw.fingerprint(d2)  # parallelism is not the definition
    assert sw.fingerprint(sw.definition(["a=1,3"], {})) != sw.fingerprint(
        sw.definition(["a=1,2"], {})
    )
    fp = sw.fingerprint(d1)
    assert sw.sweep_names(None, None, fp) == (f"sweep-{fp[:8]}", f"sweep-{fp[:8]}")
    assert sw.sweep_names(None, "sw", fp) == ("sweep-sw", "sw")
    assert sw.sweep_names("lr", "sw", fp) == ("lr", "sw")
    assert (
        sw.swept_label(["+experiment=smoke", "a=2", "run.name=x"], ["+experiment=smoke", "a=1,2"])
        == "a=2"
    )
    assert sw.override_key("++optim.lr=1") == "optim.lr" and sw.override_key("~x") == "x"


def test_job_args_replace_the_sweeps_own_keys(tmp_path):
    s = make_sweep(str(tmp_path), ["optim.lr=1,2"])
    job = sw.Job(
        num=3,
        name="sw-3",
        overrides=["optim.lr=2", "run.name=zz", "cluster.address=auto"],
        label="",
    )
    assert s.plan.job_args(job, "10.0.0.1:6379") == [
        "optim.lr=2",
        "run.name=sw-3",
        "run.group=sweep-sw",
        "cluster.address='10.0.0.1:6379'",
    ]
    # validated as given: the job's own cluster (e.g. auto under `ray job submit`) is kept
    assert s.plan.job_args(job, None) == [
        "optim.lr=2",
        "cluster.address=auto",
        "run.name=sw-3",
        "run.group=sweep-sw",
    ]


@pytest.mark.parametrize(
    "rc, summary, stopping, error, want",
    [
        (0, {"finished": True}, False, None, ("finished", None)),
        (143, {"finished": False}, True, None, ("stopped", None)),
        (-15, {}, True, None, ("stopped", None)),
        (15, {}, True, None, ("stopped", None)),  # Ray's SIGTERM handler: sys.exit(15)
        (15, {}, False, None, ("failed", "exit code 15 (no error line; see its log)")),
        (1, {}, False, "error: 2 bad steps", ("failed", "error: 2 bad steps")),
        (-9, {}, False, None, ("failed", "killed by SIGKILL")),
        (
            0,
            {"finished": False},
            False,
            None,
            ("failed", "exit code 0 but its summary.json does not say finished"),
        ),
    ],
)
def test_classify(rc, summary, stopping, error, want):
    assert classify(rc, summary, stopping, error) == want


def test_capacity_of_a_joined_cluster_refused_in_one_line(tmp_path, monkeypatch):
    from cluster import ray_private
    from trainer.config import load_config

    # a joined cluster of one 2-CPU node, without an autoscaler
    monkeypatch.setattr(ray_private, "current_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray_private, "max_resources", lambda: None)
    monkeypatch.setattr(ray_private, "node_resources", lambda: [{"CPU": 2.0}])
    s = make_sweep(
        str(tmp_path), ["cluster.cpus_per_worker=1,4"], cluster=ClusterConfig(address="auto")
    )
    runner = SweepRunner(s.plan, s)
    jobs = s.make_jobs([["cluster.cpus_per_worker=1"], ["cluster.cpus_per_worker=4"]], 0)
    common = [*SMOKE, "cluster.address=auto", "cluster.num_workers=1"]
    cfgs = [load_config([*common, *j.overrides], default_name="t") for j in jobs]
    with pytest.raises(ConfigError) as e:
        runner.check_fits(jobs, cfgs)
    assert str(e.value) == (
        "sweep job 1 (sw-1: cluster.cpus_per_worker=4): cluster.num_workers (1) needs 4 CPUs and "
        "0 GPUs, but the Ray cluster has 2 CPUs and 0 GPUs"
    )


def fake_results(s: SweepRecord) -> None:
    jobs = s.make_jobs([["optim.lr=1e-3"], ["optim.lr=2e-3"], ["optim.lr=inf"]], 0)
    for job, (status, loss, tps, err) in zip(
        jobs,
        [
            ("finished", 4.2, 1500.0, None),
            ("finished", 4.0, 1400.0, None),
            ("failed", None, None, "error: x"),
        ],
    ):
        job.status, job.final_val_loss, job.tokens_per_sec, job.error = status, loss, tps, err
        job.wall_s = 10.0
        s.jobs[job.num] = job
    s.created_at = sw.utc_now()


def test_report_table_plot_and_exit_code(tmp_path, capsys):
    s = make_sweep(str(tmp_path), ["optim.lr=1e-3,2e-3,inf"])
    fake_results(s)
    s.save()
    write_report(s, 12.5)
    out, err = capsys.readouterr()
    assert "sweep sweep-sw: 2 finished, 1 failed in 12.5 s; best: job 1 sw-1 (optim.lr=2e-3)" in out
    assert "| 2 | sw-2 | optim.lr=inf | failed | - | - | 10.0 | error: x |" in out
    assert err.strip() == "error: sweep job 2 (sw-2: optim.lr=inf) failed: error: x"
    d = tmp_path / "sweep-sw"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["best"] == "sw-1" and summary["counts"] == {"finished": 2, "failed": 1}
    assert (d / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| job | run |" in (d / "summary.md").read_text()
    assert SweepRunner(s.plan, s).exit_code() == 1
    state = json.loads((d / "sweep.json").read_text())
    assert [j["status"] for j in state["jobs"]] == ["finished", "finished", "failed"]
    assert state["fingerprint"] == s.plan.fingerprint


def test_compare_png_overlays_each_jobs_loss_curves(tmp_path, monkeypatch):
    """compare.png: one validation-loss and one training-loss line per job that logged any,
    labelled by its overrides (a job that failed before its first row has none), above the
    final values; a step logged twice (a resume) is drawn once, with its last value."""
    import matplotlib.pyplot as plt

    from trainer.driver.sweep import report

    s = make_sweep(str(tmp_path), ["optim.lr=1e-3,2e-3,inf"])
    fake_results(s)
    s.save()
    rows = {
        "sw-0": ([(1, 5.0), (2, 4.6), (3, 4.2)], [(2, 4.7), (3, 4.3)]),
        "sw-1": ([(1, 5.0), (2, 4.9), (2, 4.4), (3, 4.0)], [(3, 4.1)]),  # step 2 re-run
    }
    for name, (train, val) in rows.items():
        (tmp_path / name).mkdir()
        lines = [json.dumps({"step": k, "loss": v, "lr": 1e-3}) for k, v in train]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        lines = [json.dumps({"step": k, "val_loss": v}) for k, v in val]
        (tmp_path / name / "eval.jsonl").write_text("\n".join(lines) + "\n")
    jobs = s.sorted_jobs()
    figures = []
    real = report.compare_figure
    monkeypatch.setattr(
        report, "compare_figure", lambda *a: figures.append(real(*a)) or figures[-1]
    )
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: None)  # inspected after saving
    write_report(s, 1.0)
    assert (tmp_path / "sweep-sw" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    (val_ax, train_ax), (final_ax, tps_ax) = figures[0].axes[:2], figures[0].axes[2:4]
    assert val_ax.get_title() == "validation loss" and train_ax.get_title() == "training loss"
    for ax in (val_ax, train_ax):
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels == ["0: optim.lr=1e-3", "1: optim.lr=2e-3"], labels  # not the failed job
        assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
    val = {line.get_label(): line.get_data() for line in val_ax.get_lines()}
    assert [list(x) for x in val["0: optim.lr=1e-3"]] == [[2, 3], [4.7, 4.3]]
    train = {line.get_label(): line.get_data() for line in train_ax.get_lines()}
    assert [list(x) for x in train["1: optim.lr=2e-3"]] == [[1, 2, 3], [5.0, 4.4, 4.0]]
    assert final_ax.get_title() == "final val loss" and tps_ax.get_title() == "training tokens/s"
    assert [j.num for j in jobs] == [0, 1, 2]
    close(figures[0])


def test_sweep_directory_on_s3(s3, capsys):
    root = s3.unique_uri("sweeps")
    s = make_sweep(root, ["optim.lr=1e-3,2e-3,inf"])
    fake_results(s)
    s.save()
    write_report(s, 3.0)
    prefix = root.split("/", 3)[3] + "/sweep-sw/"
    assert {k[len(prefix) :] for k in s3.keys(prefix)} >= {
        "sweep.json",
        "summary.md",
        "summary.json",
        "compare.png",
    }
    again = make_sweep(root, ["optim.lr=1e-3,2e-3,inf"])  # the same command: the stored jobs
    assert [j.status for j in again.stored.values()] == ["finished", "finished", "failed"]
    with pytest.raises(ConfigError, match="another sweep definition"):
        make_sweep(root, ["optim.lr=7e-3"])


def test_check_sweep_validates_every_job_without_ray_for_submit():
    cfgs = sw.check_sweep([*SMOKE, "optim.lr=1e-3,2e-3"])
    assert [c.optim.lr for c in cfgs] == [1e-3, 2e-3]
    with pytest.raises(ConfigError, match=r"^sweep job 1 \(model.n_head=3\): model: "):
        sw.check_sweep([*SMOKE, "model.n_head=4,3"])
    assert sw.check_sweep(["hydra/sweeper=optuna", "optim.lr=interval(1e-4,1e-2)"]) == []
