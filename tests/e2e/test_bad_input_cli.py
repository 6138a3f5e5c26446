"""Bad input as the real commands see it: the process's exit status and all of its stderr (module
imports, logging set-up, Hydra) leave exactly one `error:` line. One case per command; every
category is covered in this process by tests/unit/test_bad_input.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import error_lines, run_cli, tree_digest

SMOKE = ["+experiment=smoke", "precision=fp32", "logging.mode=disabled"]


def _case(ws: Path, command: str) -> tuple[list[str], str]:
    damaged = ws / "notes.parquet"
    damaged.write_text("id,text\n1,hello\n")
    if command == "data_pipeline.prepare":  # damaged input
        return [f"data.sources=[{damaged}]", f"data.out_dir={ws / 'data'}"], (
            f"parquet file '{damaged}' cannot be read as Parquet"
        )
    if command == "trainer.train":  # an escaping name on a resume of the run `keep`
        args = [*SMOKE, f"run.root={ws / 'runs'}", f"data.out_dir={ws / 'data'}"]
        return [*args, "run.name=../keep"], "run: name ('../keep') must be letters, digits"
    # trainer.export: an export target under a file, before the checkpoint is read
    return [str(ws / "runs" / "keep"), str(ws / "afile" / "model")], (
        f"export target ({ws / 'afile' / 'model'}): {ws / 'afile'} exists and is not a directory"
    )


@pytest.mark.parametrize("command", ["data_pipeline.prepare", "trainer.train", "trainer.export"])
def test_one_error_line_exit_2_and_nothing_changed(tmp_path, command):
    (tmp_path / "runs" / "keep").mkdir(parents=True)
    (tmp_path / "runs" / "keep" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (tmp_path / "afile").write_text("x")
    args, message = _case(tmp_path, command)
    before = tree_digest(tmp_path)
    proc = run_cli(command, *args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = error_lines(proc)
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree_digest(tmp_path) == before
