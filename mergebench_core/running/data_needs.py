"""The runner's guarantee to methods that declare data (`MethodInfo.data`: "labeled" or "unlabeled").

Such a method always runs with a task pool (`RunContext.taskpool` is set); a cell that cannot have one is refused while
the grid is planned, before any work, with the way to give it one. Plugins therefore do not check for a missing task
pool themselves: one rule, here, says what is missing and how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence

from mergebench_core.contract.api import Method, TaskPool
from mergebench_core.errors import ConfigError

WHAT = {
    "labeled": "labeled training examples (a task pool's train split)",
    "unlabeled": "unlabeled inputs of its tasks (from a task pool)",
}


class MissingTaskPool(ConfigError):
    """A method that declares it needs data has no task pool to take it from."""


def needs_data(method: type[Method] | Method) -> bool:
    return method.info.data != "none"


def missing_task_pool(methods: Sequence[type[Method] | Method], where: str, fix: str) -> MissingTaskPool:
    """The refusal for `methods` (each declaring data) that have no task pool `where`: what each reads, and `fix`."""
    needs = "; ".join(f"{m.name} needs {WHAT.get(m.info.data, 'data from a task pool')}" for m in methods)
    return MissingTaskPool(f"{needs}; and there is no task pool {where}: {fix}")


def require_task_pool(method: type[Method] | Method, taskpool: TaskPool | None, *, where: str = "here",
                      fix: str = "run it through `mergebench run`, or pass a RunContext with a taskpool") -> TaskPool:
    """`taskpool`, or the `MissingTaskPool` refusal for `method`."""
    if taskpool is None:
        raise missing_task_pool([method], where, fix)
    return taskpool
