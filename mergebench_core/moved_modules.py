"""Where the modules of the flat core went when it was grouped into rooms, so that imports written before still work.

`import mergebench_core.merging` (or `from mergebench_core.tensors import StateDictSource`) gives the very module
that now lives at `mergebench_core.engine.merging`: one module object under two names, so classes and isinstance
checks are shared. Our own code imports the new paths; this table exists for third-party plugins.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

MOVED: dict[str, str] = {
    "api": "contract.api",
    "hookspecs": "contract.hookspecs",
    "registry": "contract.registry",
    "config": "contract.config",
    "splits": "data.splits",
    "metrics": "data.metrics",
    "evaluation": "data.evaluation",
    "stats": "data.statistics",
    "pool_views": "pools.views",
    "pool_params": "pools.params",
    "tensors": "engine.tensors",
    "roles": "engine.roles",
    "sparsify": "engine.sparsify",
    "pipeline": "engine.pipeline",
    "merging": "engine.merging",
    "running_stats": "engine.running_stats",
    "runner": "running.runner",
    "executors": "running.executors",
    "ray_executor": "running.ray_executor",
    "resources": "running.resources",
    "loggers": "running.loggers",
    "store": "results.store",
    "leaderboard": "results.leaderboard",
    "html_report": "results.html_report",
    "plots": "results.plots",
    "trained": "training.methods",
    "alignment": "fusion.alignment",
    "pareto": "preferences.pareto",
}
"""Old module name (under `mergebench_core.`) -> its new place. `data`, `training`, `fusion` and `preferences` are
not here: they became packages of the same name that re-export what the old module offered."""

PACKAGE = __name__.rpartition(".")[0]


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module is already executed."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers only for `mergebench_core.<old name>`; every other import goes on to the usual finders."""

    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.rpartition(".")
        if prefix != PACKAGE or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(f"{PACKAGE}.{MOVED[name]}"))


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
