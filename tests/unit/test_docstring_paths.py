"""Docstrings and comments name files that exist: every repo path a .py file's docstring,
string or comment names (trainer/..., cluster/..., data_pipeline/..., models/..., conf/...,
bench/..., tests/...) is a file or directory of this checkout."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("trainer", "cluster", "data_pipeline", "models", "conf", "bench", "tests")
# A path starts at a top-level directory (not inside a longer path or word) and runs over
# name characters; a template such as f"conf/{group}/" stops at the brace, a glob at the star.
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(PACKAGES)})/[\w./-]*\w)")


def named_paths(source: str) -> list[tuple[int, str]]:
    """(line, path) of every repo path in the comments and string literals of `source`."""
    kinds = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)}
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in kinds:
            found += [(tok.start[0], m.group(1)) for m in PATH.finditer(tok.string)]
    return found


def stale_paths(source: str, root: Path = ROOT) -> list[str]:
    return [f"{line}: {path}" for line, path in named_paths(source) if not (root / path).exists()]


def python_files() -> list[Path]:
    """Every .py file of the repo but this one (its sample names stale paths on purpose)."""
    this = Path(__file__).resolve()
    return sorted(p for d in PACKAGES for p in (ROOT / d).rglob("*.py") if p.resolve() != this)


def test_the_check_finds_a_stale_path():
    source = (
        '"""Moved: see trainer/engine.py and tests/unit/test_config.py."""\n'
        "x = 1  # from trainer/worker/parallel.py, once in trainer/parallel.py\n"
        'y = f"conf/{group}/"  # a template, not a path\n'
    )
    assert stale_paths(source) == ["1: trainer/engine.py", "2: trainer/parallel.py"]


def test_every_named_path_exists():
    stale = [
        f"{p.relative_to(ROOT)}:{where}"
        for p in python_files()
        for where in stale_paths(p.read_text())
    ]
    assert not stale, f"docstrings/comments name paths that do not exist: {stale}"
