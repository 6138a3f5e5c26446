"""cluster/submit.py without a cluster: cluster/ imports nothing from trainer/, both command-line
forms, and the entrypoint's own validate-only mode (`python -m trainer.train --check`) that
submit runs before it submits."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from cluster import submit
from trainer.train import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["+experiment=smoke", "logging.mode=disabled"]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports (at any depth: functions included), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_cluster_imports_nothing_from_trainer_or_data_pipeline():
    files = sorted((ROOT / "cluster").rglob("*.py"))
    assert any(p.name == "submit.py" for p in files)
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for p in files
        for line, mod in imported_modules(p)
        if mod.split(".")[0] in ("trainer", "data_pipeline")
    ]
    assert bad == []


def test_the_import_scan_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from trainer.config import load_config\n")
    assert imported_modules(f) == [(2, "trainer.config")]


def test_both_forms_of_the_command_line():
    assert submit.split_entrypoint(["--address", "u", "a=1"]) == (
        ["--address", "u", "a=1"],
        None,
        [],
    )
    opts, python, args = submit.split_entrypoint(
        ["--address", "u", "--no-wait", "--", "python3", "-m", "trainer.train", "-m", "a=1,2"]
    )
    assert (opts, python, args) == (["--address", "u", "--no-wait"], "python3", ["-m", "a=1,2"])
    with pytest.raises(submit.SubmitError, match=r"must be `python -m trainer.train"):
        submit.split_entrypoint(["--address", "u", "--", "bash", "-c", "true"])


def test_cluster_ray_added_unless_a_cluster_is_given():
    assert submit.with_cluster(["-m", "a=1,2"]) == ["-m", "cluster=ray", "a=1,2"]
    assert submit.with_cluster(["cluster.address=auto", "a=1"]) == ["cluster.address=auto", "a=1"]
    assert submit.with_cluster(["cluster=local"]) == ["cluster=local"]


def check(args: list[str], capsys) -> tuple[int, list[str], list[str]]:
    rc = main(["--check", *args])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_check_validates_a_run_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://store.example:9000")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/home/me/.aws/credentials")
    rc, out, errors = check(
        [*SMOKE, f"run.root={tmp_path}", "run.name=r", "cluster.address=auto"], capsys
    )
    assert rc == 0 and errors == []
    info = json.loads(out[-1].removeprefix("ok: "))
    env = info.pop("storage_env")  # what cluster/submit.py hands the job: no local file paths
    assert env["AWS_ENDPOINT_URL"] == "http://store.example:9000"
    assert "AWS_SHARED_CREDENTIALS_FILE" not in env
    assert submit.job_env(stop_grace_s=5, storage_env=env)["AWS_ENDPOINT_URL"] == (
        "http://store.example:9000"
    )
    assert info == {"run": "r", "run.root": str(tmp_path), "cluster.address": "auto"}
    assert not any(tmp_path.iterdir())


def test_check_of_a_sweep_validates_every_job_and_writes_nothing(tmp_path, capsys):
    base = [*SMOKE, f"run.root={tmp_path}", "run.name=sw"]
    rc, out, errors = check(["-m", *base, "optim.lr=1e-3,2e-3,3e-3"], capsys)
    assert rc == 0 and errors == []
    info = json.loads(out[-1].removeprefix("ok: "))
    assert info["sweep"] == "sweep-sw" and info["jobs"] == 3 and info["cluster.address"] is None
    assert not any(tmp_path.iterdir())

    rc, out, errors = check(["-m", *base, "model.n_head=4,3"], capsys)
    assert rc == 2 and len(errors) == 1
    assert errors[0].startswith("error: sweep job 1 (sw-1: model.n_head=3): model:")
    rc, out, errors = check(["-m", *base, "cluster.cpus_per_worker=1,1000"], capsys)
    assert rc == 2 and "sweep job 1 (sw-1: cluster.cpus_per_worker=1000)" in errors[0]
    assert "the local cluster cannot hold them" in errors[0]
    assert not any(tmp_path.iterdir())


def test_check_of_an_optuna_sweep_validates_its_first_batch(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    rc, out, errors = check(
        ["-m", *SMOKE, f"run.root={tmp_path}", "run.name=sw", "hydra/sweeper=optuna",
         "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "optim.lr=interval(1e-4,1e-2)"],
        capsys,
    )  # fmt: skip
    assert rc == 0 and errors == []
    assert "sweep sweep-sw: the sweeper's first batch: 2 job(s) valid" in out[-2]
    assert json.loads(out[-1].removeprefix("ok: "))["jobs"] == 2
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, entry",
    [
        (["--address", "http://h:8265", "--no-wait", "-m", "optim.lr=1,2"],
         ["-m", "cluster=ray", "optim.lr=1,2"]),
        (["--address", "http://h:8265", "--stop-grace-s", "30", "--", "python", "-m",
          "trainer.train", "cluster.address=auto", "a=1"],
         ["cluster.address=auto", "a=1"]),
    ],
    ids=["overrides", "entrypoint"],
)  # fmt: skip
def test_both_forms_reach_the_check_with_the_entrypoints_arguments(
    argv, entry, monkeypatch, capsys
):
    seen = []

    def check_entrypoint(args):
        seen.append(args)
        return {"run": "r", "run.root": "/x", "cluster.address": None}

    monkeypatch.setattr(submit, "check_entrypoint", check_entrypoint)
    assert submit.main(argv) == 2
    assert seen == [entry]
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: cluster.address is null: a submitted job must join its cluster "
        "(use cluster=ray or cluster.address=auto)"
    )


def test_bad_options_refused_before_the_check(monkeypatch, capsys):
    monkeypatch.setattr(submit, "check_entrypoint", lambda args: pytest.fail("checked"))
    assert submit.main(["--address", "u", "--stop-grace-s", "0", "a=1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --stop-grace-s (0) must be >= 1"
    assert submit.main(["--address", "u", "--", "bash", "run.sh"]) == 2
    assert "must be `python -m trainer.train [-m] [overrides]`" in capsys.readouterr().err


def job_config(env_vars: dict[str, str] | None, submission_id: str = "raysubmit_x") -> str:
    """What Ray's JobSupervisor hands the driver of a submitted job in RAY_JOB_CONFIG_JSON_ENV_VAR
    (ray/dashboard/modules/job/job_supervisor.py's _get_driver_env_vars)."""
    runtime_env = {} if env_vars is None else {"env_vars": env_vars}
    metadata = {"job_submission_id": submission_id, "job_name": submission_id}
    return json.dumps({"runtime_env": runtime_env, "metadata": metadata})


@pytest.mark.parametrize(
    "env_vars, warned",
    [
        (None, "no RAY_JOB_STOP_WAIT_TIME_S, Ray's default"),
        ({"RAY_JOB_STOP_WAIT_TIME_S": "10"}, "RAY_JOB_STOP_WAIT_TIME_S=10"),
        ({"RAY_JOB_STOP_WAIT_TIME_S": "120"}, None),
    ],
)
def test_a_job_under_a_short_stop_grace_says_so_in_its_first_line(
    env_vars, warned, tmp_path, capsys, monkeypatch
):
    from cluster.launch import stop_grace_warning

    monkeypatch.delenv("RAY_JOB_STOP_WAIT_TIME_S", raising=False)
    assert stop_grace_warning() is None  # not inside a Ray job
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", job_config(env_vars))
    for k, v in (env_vars or {}).items():  # the supervisor's environment, copied to the driver
        monkeypatch.setenv(k, v)
    # A bad override: main() refuses it, after the warning line.
    rc = main([*SMOKE, f"run.root={tmp_path}", "trainer.max_steps=-1"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err[-1].startswith("error:")
    if warned is None:
        assert stop_grace_warning() is None and len(err) == 1
        return
    assert len(err) == 2 and warned in err[0], err
    assert err[0].startswith("warning: this Ray job is killed ")
    assert """--runtime-env-json '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}'""" in err[0]
    assert "`python -m cluster.submit`" in err[0]


def test_a_failed_in_process_run_does_not_point_to_rays_logs(tmp_path):
    from trainer.config import load_config
    from trainer.train import logs_hint

    base = [*SMOKE, f"run.root={tmp_path}", "run.name=r"]
    here = load_config([*base, "cluster.num_workers=1", "cluster.launch=auto"])
    assert here.cluster.in_process
    assert "Ray" in logs_hint(here) and "/tmp/ray" not in logs_hint(here)
    assert logs_hint(here).startswith(f"run files: {here.run_uri}")
    on_ray = load_config([*base, "cluster.num_workers=1", "cluster.launch=ray"])
    assert "Ray's logs under /tmp/ray" in logs_hint(on_ray)
