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


@hookspec
def register_commands(register: Callable[..., None]) -> None:
    """Add subcommands to `mergebench`: `register(name, run, arguments=None, help="")`. `arguments(parser)` adds the
    command's options to its argparse parser; `mergebench NAME ...` then calls `run(args)` with the parsed
    namespace, and its return value is the exit status (None: 0). A MergebenchError raised by `run` is printed as one
    `error:` line (exit 2), like the core commands' errors.

    An application that serves one plugin (an experiment, a report) lives in that plugin and adds its command here,
    so the command line names no plugin. A name already taken (by a core command or another plugin) is refused, and
    a plugin whose hook or `arguments` raises is listed as broken by `mergebench list` without taking the command
    line down. Keep module imports light: the hook runs whenever the plugins load, `arguments` only when the
    command line is built, and `run` only when the command is chosen.
    """
