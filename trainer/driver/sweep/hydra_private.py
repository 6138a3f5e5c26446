"""Hydra's private API, in this one module: what a sweep needs of Hydra that Hydra does not
publish. tests/unit/test_hydra_private.py pins the behaviour each function relies on, so a Hydra
upgrade that changes it fails there, naming this file.

- run_multirun: Hydra's `-m` run in this process (hydra._internal.hydra.Hydra and its config loader;
  @hydra.main would parse sys.argv and exit), the task function handed on to the launcher's
  setup as the same object (the sweep reaches its launcher through it: launcher.py).
- grid_jobs: the jobs of a basic (grid/choice) sweep in Hydra's order (BasicSweeper).
- register_launcher: a launcher class that `hydra/launcher=<name>` instantiates. Hydra
  instantiates plugins only from its plugin namespace (hydra_plugins.*), by module path.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

CHECKED_WITH = "hydra-core 1.3.8"  # the version whose behaviour the unit test pinned first
PLUGIN_NAMESPACE = "hydra_plugins"


def run_multirun(
    conf_dir: str, config_name: str, overrides: Sequence[str], task_function: Callable[..., Any]
) -> None:
    """Runs Hydra's multirun over conf_dir/config_name with `overrides`: the sweeper asks the
    configured launcher, whose setup gets `task_function` itself, to run its batches."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path

    loader = ConfigLoaderImpl(create_config_search_path(conf_dir))
    hydra = Hydra(task_name="trainer.train", config_loader=loader)
    hydra.multirun(config_name=config_name, task_function=task_function, overrides=list(overrides))


def grid_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs of a basic sweep of `overrides` (no hydra.* ones), in the order Hydra's basic
    sweeper runs them. Raises Hydra's own error for an override it cannot parse."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def register_launcher(cls: type, name: str, provider: str = "raygpt") -> str:
    """Makes `hydra/launcher=<name>` instantiate `cls` (a hydra.plugins.launcher.Launcher) and
    returns its plugin path. The class is registered as hydra_plugins.<name>_launcher.<class>
    and its module made importable under that name; the code stays where it is. Idempotent."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    module = f"{PLUGIN_NAMESPACE}.{name}_launcher"
    try:
        importlib.import_module(PLUGIN_NAMESPACE)
    except ImportError:  # no Hydra plugin package installed: an empty namespace
        namespace = types.ModuleType(PLUGIN_NAMESPACE)
        namespace.__path__ = []
        sys.modules[PLUGIN_NAMESPACE] = namespace
    if cls.__module__ != module:
        sys.modules[module] = sys.modules[cls.__module__]
        cls.__module__ = module
    Plugins.instance().register(cls)
    target = f"{module}.{cls.__qualname__}"
    ConfigStore.instance().store(
        group="hydra/launcher", name=name, node={"_target_": target}, provider=provider
    )
    return target
