"""The config modules are leaves: pure rules that import no torch and nothing of the worker
or the driver (checked in a fresh interpreter, and over every import statement, lazy ones
included); the data pipeline imports nothing of the trainer."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEAVES = [
    "trainer.config",
    "trainer.layout",
    "trainer.memory_plan",
    "data_pipeline.config",
    "cluster.config",
]
FORBIDDEN = ("torch", "deepspeed", "ray", "trainer.worker", "trainer.driver")


def imported_names(path: Path) -> list[str]:
    """Every module an import statement of `path` names, at any depth (lazy ones too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", LEAVES)
def test_config_modules_load_no_torch_worker_or_driver(module):
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = [m for m in json.loads(out.stdout.splitlines()[-1]) if _under(m, FORBIDDEN)]
    assert not loaded, f"importing {module} loads {loaded[:5]}"


@pytest.mark.parametrize("module", LEAVES)
def test_config_modules_name_no_torch_worker_or_driver(module):
    path = ROOT / (module.replace(".", "/") + ".py")
    bad = [n for n in imported_names(path) if _under(n, FORBIDDEN)]
    assert not bad, f"{module} imports {bad}"


def test_the_data_pipeline_imports_nothing_of_the_trainer():
    bad = [
        f"{p.relative_to(ROOT)}: {n}"
        for p in sorted((ROOT / "data_pipeline").rglob("*.py"))
        for n in imported_names(p)
        if _under(n, ("trainer",))
    ]
    assert not bad, f"data_pipeline imports trainer code: {bad}"


def test_the_check_sees_a_lazy_import(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from trainer.worker import guard\n")
    assert imported_names(tmp_path / "m.py") == ["trainer.worker"]
