"""Never lose a run: a resume that would not fit the checkpoint fails before any worker starts,
with one `error:` line, and leaves the run directory byte-identical; secrets in the
environment never reach a file of the run; the run's own output, piped as CI and `ray job
submit` logs are, is plain text without Ray's failure-like noise.

One real 2-worker run on Ray through the command line (W&B offline, fake secrets in its
environment) is shared by the tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from cli_helpers import error_lines, run_cli, tree_digest

from trainer.config import load_config

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("ray_cluster")]

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "WANDB_API_KEY": "fake-secret-0123456789abcdef0123456789abcdef",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-Zq9Xw8Vu7Ts6Rp5On4Ml3Kj2",
}
RUN = ["+experiment=smoke", "precision=bf16", "trainer.max_steps=4"]  # the bf16_ shard names
RUN += ["trainer.checkpoint_interval=2"]
RUN += ["trainer.eval_interval=0", "trainer.sample_tokens=0", "run.name=safe"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli("trainer.train", *args, timeout=400, env=env)


def files_containing(root: Path, needles: list[bytes]) -> list[str]:
    return sorted(
        str(p) for p in root.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smoke_data):
    """A finished run (checkpoints at steps 2 and 4) made with fake secrets in its environment."""
    root = tmp_path_factory.mktemp("runs")
    ray_tmp = tempfile.mkdtemp(prefix="rg-", dir="/tmp")  # AF_UNIX socket paths max 107 bytes
    env = {**SECRETS, "RAY_TMPDIR": ray_tmp}
    proc = cli(
        *RUN, "logging.mode=offline", f"run.root={root}", f"data.out_dir={smoke_data}", env=env
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    yield {"root": root, "run_dir": root / "safe", "proc": proc, "ray_tmp": Path(ray_tmp)}
    shutil.rmtree(ray_tmp, ignore_errors=True)


def resume(root: Path, data: str, *extra: str) -> subprocess.CompletedProcess:
    return cli(*RUN, "logging.mode=disabled", f"run.root={root}", f"data.out_dir={data}", *extra)


def test_same_config_resumes_from_the_registered_checkpoint(trained, smoke_data):
    from trainer.checkpoint.compat import check_resume_compatible

    run_dir = trained["run_dir"]
    ckpt = run_dir / "checkpoint_00000004"
    assert {p.name for p in (ckpt / "files").iterdir()} == {"rank_0.json", "rank_1.json"}
    overrides = [*RUN, f"run.root={trained['root']}", f"data.out_dir={smoke_data}"]
    assert check_resume_compatible(load_config(overrides), echo=False) == str(ckpt)
    # another worker count is not an error here (resharding is handled on load)
    fewer = ["cluster.num_workers=1", "trainer.global_batch_size=4"]
    assert check_resume_compatible(load_config([*overrides, *fewer]), echo=False) == str(ckpt)


def test_other_model_shape_fails_with_one_line_and_touches_nothing(trained, smoke_data):
    run_dir = trained["run_dir"]
    before = tree_digest(run_dir)
    proc = resume(trained["root"], smoke_data, "model.n_layer=3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_lines(proc) == [
        "error: cannot resume run 'safe' from checkpoint_00000004: model.n_layer is 2 there, "
        "3 now (start a new run.name, or restore the config)"
    ], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert tree_digest(run_dir) == before


def test_other_tokenizer_fails_with_one_line_and_touches_nothing(trained, tmp_path):
    from data_pipeline.prepare import prepare

    other = tmp_path / "other-vocab"  # same corpus and seq_len, a 384-token BPE
    cfg = load_config(["+experiment=smoke", f"data.out_dir={other}", "data.vocab_size=384"])
    prepare(cfg.data)  # on the module's Ray (ray_cluster)
    run_dir = trained["run_dir"]
    before = tree_digest(run_dir)
    proc = resume(trained["root"], str(other), "data.vocab_size=384")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: cannot resume run 'safe' from checkpoint_00000004: ")
    assert "the tokenizer is sha256 " in errors[0] and str(other) in errors[0]
    assert tree_digest(run_dir) == before


def test_truncated_shard_fails_with_one_line_naming_it(trained, smoke_data, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(trained["run_dir"], root / "safe")
    shard = root / "safe" / "checkpoint_00000004" / "ds" / "ds"
    shard = shard / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    before = tree_digest(root)
    proc = resume(root, smoke_data)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert f"{shard}: truncated: expected {size} bytes, found {size - 1000}" in errors[0]
    assert tree_digest(root) == before


def test_secrets_in_the_environment_reach_no_file_of_the_run(trained, tmp_path):
    run_dir = trained["run_dir"]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    # everything a run writes is there to be searched
    assert {"config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json"} <= names
    assert {"trainer_state.json", "mp_rank_00_model_states.pt", "rank_0.pt"} <= names
    assert any(p.suffix == ".wandb" for p in files), "no W&B offline run file"
    assert any(p.match("wandb/offline-run-*/files/*") for p in files), names

    needles = [v.encode() for v in SECRETS.values()]
    planted = tmp_path / "planted.bin"  # the search itself finds a secret where there is one
    planted.write_bytes(b"\x00prefix" + needles[1] + b"\xff")
    assert files_containing(tmp_path, needles) == [str(planted)]

    assert files_containing(run_dir, needles) == []
    proc = trained["proc"]
    assert not any(n.decode() in proc.stdout + proc.stderr for n in needles)
    assert any(trained["ray_tmp"].rglob("session_*/logs/*.log")), "no Ray session logs"
    assert files_containing(trained["ray_tmp"], needles) == []  # Ray's session logs


def test_its_output_is_plain_text_and_names_both_throughputs(trained):
    """Output to a file or pipe carries no colour escape codes and none of Ray's lines that
    look like failures; the summary names training and end-to-end tokens/s apart."""
    proc = trained["proc"]
    out = proc.stdout + proc.stderr
    assert "(RayTrainWorker pid=" in out  # the workers' lines did come through
    assert "\x1b[" not in out
    # Noise that reads like a failure: Ray's token-auth warning, Ray Train's PreemptionWatcher
    # ERROR line (cluster/ray_private.py); the DeepSpeed comm op build, if any, is announced.
    assert "Token authentication is enabled" not in out
    assert "PreemptionWatcher" not in out
    summary = json.loads((trained["run_dir"] / "summary.json").read_text())
    assert summary["train_tokens_per_sec"] > 0 and summary["end_to_end_tokens_per_sec"] > 0
    assert "training tokens/s" in proc.stdout and "end-to-end tokens/s" in proc.stdout
