"""Composing conf/ with Hydra's compose API, for every command that reads it: training
(trainer/config.py, with every group's schema) and `python -m data_pipeline.prepare` (with the
model and data schemas only, so the data pipeline imports nothing of the trainer).

A schema is group -> frozen dataclass. Each becomes a typed, closed node holding the
dataclass's defaults (the one place defaults are stated; conf/ files state what a choice
changes), registered as `raygpt_schema`, which conf/config.yaml lists first. Every failure
is raised as the caller's error type with one line naming the override or the file.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SCHEMA_NAME = "raygpt_schema"

# A name that becomes one directory (run.name under run.root, sweep.name, a config group's
# file under conf/): no separator, no '..', nothing hidden or flag-like.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def plain_name_error(key: str, value: str, role: str) -> Optional[str]:
    """The one-line complaint when `value` is not a plain name (None when it is)."""
    if isinstance(value, str) and PLAIN_NAME.fullmatch(value):
        return None
    return (
        f"{key} ({value!r}) must be letters, digits, '.', '_' or '-', not starting with '.' "
        f"or '-' ({role}: a plain name cannot leave its directory)"
    )


def _writable_schema(cls: type) -> DictConfig:
    """A structured (typed, closed) node for `cls` that Hydra can merge group files into.

    OmegaConf marks nodes of frozen dataclasses read-only, which would refuse every merge;
    the schema keeps its types and closed key set, and freezing happens at instantiation.
    """
    node = OmegaConf.structured(cls)

    def unfreeze(n) -> None:
        n._set_flag("readonly", None)
        if isinstance(n, DictConfig) and OmegaConf.get_type(n) is dict:
            n._set_flag("struct", False)  # a dict field (data.mixture.sources) takes new keys
        if isinstance(n, DictConfig):
            for k in n.keys():
                unfreeze(n._get_node(k))
        elif isinstance(n, ListConfig):
            for i in range(len(n)):
                unfreeze(n._get_node(i))

    unfreeze(node)
    return node


_NODES: dict[tuple, DictConfig] = {}


def schema_node(schema: dict[str, type], *, closed: bool = True) -> DictConfig:
    """The root schema node of `schema` (built once per schema). closed: no other top-level
    group (a file or an override naming one fails); open: other groups compose untyped."""
    key = (tuple(schema.items()), closed)
    if key not in _NODES:
        root = OmegaConf.create({g: _writable_schema(c) for g, c in schema.items()})
        OmegaConf.set_struct(root, closed)
        _NODES[key] = root
    return _NODES[key]


def register_schema(schema: dict[str, type], *, closed: bool = True) -> None:
    """Registers `schema` as conf/config.yaml's `raygpt_schema` (Hydra reads it from there)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=schema_node(schema, closed=closed))


@contextlib.contextmanager
def _schema_registered(schema: dict[str, type], *, closed: bool) -> Iterator[None]:
    """`schema` registered while composing; whatever was registered before comes back after
    (a process that both trains and prepares keeps training's full schema)."""
    repo = ConfigStore.instance().repo
    key = f"{SCHEMA_NAME}.yaml"
    before = repo.get(key)
    register_schema(schema, closed=closed)
    try:
        yield
    finally:
        if before is None:
            repo.pop(key, None)
        else:
            repo[key] = before


def one_line(e: BaseException) -> str:
    """Hydra/OmegaConf errors span lines (with full_key=...); keep what the user needs."""
    parts = [str(e).strip().splitlines()[0].rstrip(".")] if str(e).strip() else []
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0]
        if first not in parts:
            parts.append(first)
    return ": ".join(parts) or type(e).__name__


def check_group_options(
    overrides: list[str], *, conf_dir: Path = CONF_DIR, error: type[Exception] = ValueError
) -> None:
    """A config-group choice (model=, +experiment=, sweeps of them) names one file of its
    conf/ directory: a path such as model=../experiment/smoke would load a file of another
    group, so only plain names are taken. Overrides Hydra cannot parse are left to compose,
    which names them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for line in overrides:
        try:
            (o,) = parser.parse_overrides([line])
        except HydraException:
            continue
        group = o.key_or_group
        if o.is_delete() or "." in group or "@" in group or not (conf_dir / group).is_dir():
            continue
        value = o.value()
        if o.is_sweep_override():
            values = getattr(value, "list", None)  # a,b / choice(a,b); glob() lists real files
            if values is None:
                continue
        else:
            values = [value]
        for value in values:
            if msg := plain_name_error(group, value, f"a file of conf/{group}/"):
                raise error(msg)


def _override_parse_error(overrides: list[str]) -> Optional[str]:
    """Which override Hydra's grammar rejects, and why (its message has no position)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for line in overrides:
        try:
            parser.parse_overrides([line])
        except HydraException as e:
            return f"cannot parse override {line!r}: {one_line(e)}"
    return None


def _yaml_error(e: BaseException) -> str:
    """A YAML syntax error of a conf/ file as `file:line:col: problem` (PyYAML's 0-based
    marks made 1-based)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = " ".join(str(getattr(e, "problem", "") or e).split())
    if mark is None:
        return f"invalid YAML: {problem}"
    where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None and cmark is not mark:
        problem += f" ({context} at {cmark.line + 1}:{cmark.column + 1})"
    return f"{where}: invalid YAML: {problem}"


def _untyped_as_given(overrides: list[str], schema: dict[str, type]) -> list[str]:
    """Overrides of keys of groups outside `schema` (trainer.*, optim.* for prepare) as
    force-adds: the caller composes without those groups' schemas and reads none of them,
    so the same command line as training's is taken as is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for line in overrides:
        try:
            (o,) = parser.parse_overrides([line])
        except HydraException:
            out.append(line)  # compose names it
            continue
        key = o.key_or_group
        top = key.split(".", 1)[0]
        if "." in key and top not in schema and top != "hydra" and not line.startswith(("+", "~")):
            line = f"++{line}"
        out.append(line)
    return out


def compose(
    overrides: list[str],
    schema: dict[str, type],
    *,
    conf_dir: Path = CONF_DIR,
    error: type[Exception] = ValueError,
    others_as_given: bool = False,
) -> DictConfig:
    """Composes conf_dir/config.yaml with Hydra overrides (no Hydra run dir, no chdir); the
    groups of `schema` typed, closed and filled with their dataclass defaults.

    others_as_given: the caller reads only the groups of `schema`; overrides of other keys
    are taken without a check (with every group's schema, a misspelled key fails instead)."""
    import yaml

    overrides = list(overrides)
    check_group_options(overrides, conf_dir=conf_dir, error=error)
    try:
        with _schema_registered(schema, closed=not others_as_given):
            with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
                given = _untyped_as_given(overrides, schema) if others_as_given else overrides
                return hydra_compose(config_name="config", overrides=given)
    except yaml.YAMLError as e:  # a conf/ file with a syntax error
        raise error(_yaml_error(e)) from None
    except (HydraException, OmegaConfBaseException) as e:
        msg = one_line(e)
        if isinstance(e, OverrideParseException):
            msg = _override_parse_error(overrides) or msg
        missing = re.search(r"Could not find '(\w+)/([^']+)'", msg)
        if missing and (conf_dir / missing.group(1)).is_dir():
            options = sorted(p.stem for p in (conf_dir / missing.group(1)).glob("*.yaml"))
            msg = f"{missing.group(1)}={missing.group(2)} does not exist; choose one of {options}"
        raise error(msg) from None
