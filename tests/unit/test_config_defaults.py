"""Defaults are stated once, in the dataclasses (GPTConfig, DataConfig, ClusterConfig and
trainer/config.py's groups): they are built directly by code and tests, and the Hydra schema
carries them into every composed config. A conf/ group file states its `name` and only what
its choice changes; a restated default would be a second home that can drift (as optim.lr did:
6e-4 in the dataclass, 1e-3 in conf/optim/adamw.yaml)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml

from trainer.config import CONF_DIR, GROUPS, load_config


def defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def restated_defaults(group: str, raw: dict[str, Any]) -> list[str]:
    """The keys of a group file's mapping `raw` that repeat the dataclass default (`name`, the
    file's identity, is stated by every file; test_config checks it matches the file name)."""
    dflt = defaults(GROUPS[group])
    return [
        f"{group}.{k} = {v!r}"
        for k, v in raw.items()
        if k != "name" and k in dflt and v == dflt[k] and not dataclasses.is_dataclass(dflt[k])
    ]


def group_files() -> list[tuple[str, Any]]:
    """(group, path) of every group file, and (group, conf/config.yaml) for its root sections."""
    files = [(g, p) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
    root = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
    return files + [(g, CONF_DIR / "config.yaml") for g in GROUPS if g in root]


@pytest.mark.parametrize("group,path", group_files(), ids=lambda x: getattr(x, "name", x))
def test_no_conf_file_restates_a_default(group, path):
    raw = yaml.safe_load(path.read_text()) or {}
    if path.name == "config.yaml":
        raw = raw[group]
    restated = restated_defaults(group, raw)
    assert not restated, (
        f"{path.relative_to(CONF_DIR.parent)} restates the dataclass defaults {restated}: "
        "state a default once, in the dataclass"
    )


def test_the_check_finds_a_restated_default():
    raw = {"name": "adamw", "lr": 1e-3, "warmup_steps": 30, "weight_decay": 0.2}
    assert restated_defaults("optim", raw) == ["optim.lr = 0.001", "optim.warmup_steps = 30"]
    assert restated_defaults("optim", {"name": "adamw", "lr": 3e-4}) == []


def test_every_group_file_key_is_a_field():
    for group, path in group_files():
        raw = yaml.safe_load(path.read_text()) or {}
        raw = raw[group] if path.name == "config.yaml" else raw
        assert set(raw) <= set(defaults(GROUPS[group])) | {"name"}, path


def test_a_default_run_gets_what_the_golden_losses_were_made_with():
    # moving the defaults into the dataclasses kept the values runs composed before
    cfg = load_config(["+experiment=smoke"], default_name="t")
    o = cfg.optim
    assert (o.lr, o.warmup_steps, o.min_lr_ratio, o.schedule, o.weight_decay) == (
        1e-3,
        5,
        0.1,
        "cosine",
        0.1,
    )
    assert load_config([], default_name="t").optim.warmup_steps == 30
