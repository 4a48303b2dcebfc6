"""The plugin contract: the hooks a mergebench plugin may implement.

A plugin declares an entry point in the group `mergebench` that points at a module; the module implements any of
these hooks with `@mergebench_core.hookimpl`. Each hook receives a `register` callable and calls it once per thing.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("mergebench")
hookimpl = pluggy.HookimplMarker("mergebench")


@hookspec
def register_methods(register: Callable[[type], None]) -> None:
    """Register Method subclasses: `register(MyMethod)`."""


@hookspec
def register_modelpools(register: Callable[..., None]) -> None:
    """Register model pools: `register(name, factory, description="", default=False, params=None)`; `factory()`
    builds it, or `factory(params)` when `params` names a dataclass of the pool's parameters (every field with a
    default that reproduces the pool as registered), chosen as `NAME(key=value)`, `pool.key=value` or a config file's
    `modelpool:` section (`mergebench_core.pools.params`)."""


@hookspec
def register_taskpools(register: Callable[..., None]) -> None:
    """Register task pools: `register(name, factory, description="")`; `factory()` builds the TaskPool."""




@hookspec
def register_loggers(register: Callable[..., None]) -> None:
    """Register per-step metric loggers: `register(name, factory)`; `factory(run_name, run_info)` returns an object
    with `log(step, metrics)` and `close()`. Switched on with `mergebench run --logger NAME`."""
