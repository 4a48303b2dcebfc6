"""`mergebench list`: the methods, pools, loggers and commands that the installed plugins provide, with their
distributions, and the plugins that are broken or clash."""

from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import Any

import mergebench_core.contract.registry as registry_module
from mergebench_core.cli.plugin_commands import command_options, core_clash
from mergebench_core.contract.registry import Registry
from mergebench_core.errors import PluginError


def cmd_list(args: argparse.Namespace) -> int:
    """Everything the installed plugins provide, and what is wrong with them: exit 1 when a plugin is broken."""
    from tabulate import tabulate

    from mergebench_core.training.methods import TrainingMethod

    registry = registry_module.get_registry()
    for title, table in (("Methods", registry.methods), ("Model pools", registry.modelpools),
                         ("Task pools", registry.taskpools), ("Loggers", registry.loggers),
                         ("Commands", registry.commands)):
        if title in ("Loggers", "Commands") and not table:
            continue
        rows = []
        for name, reg in sorted(table.items()):
            extra = ""
            if reg.kind == "method":
                info = reg.obj.info
                extra = f"{info.kind}, data: {info.data}" + (", stochastic" if info.stochastic else "") + \
                    (", preference-aware" if info.preference_aware else "")
                if issubclass(reg.obj, TrainingMethod) and reg.obj.produces == "pool":
                    extra += ", derives pools"
            elif reg.default:
                extra = "default"
            rows.append([name, f"{reg.distribution} {reg.version}".strip(), extra, reg.description])
        print(f"{title}:")
        print(tabulate(rows, headers=["name", "provided by", _third_column(title), "description"], tablefmt="simple")
              if rows else "  (none installed)")
        print()
        if title == "Model pools":
            _list_pool_params(registry)
        if title == "Task pools":
            _list_taskpool_params(registry)
    makers = sorted(n for n, r in registry.methods.items()
                    if issubclass(r.obj, TrainingMethod) and r.obj.produces == "pool")
    if makers:
        default = next((n for n, r in sorted(registry.modelpools.items()) if r.default), "POOL")
        print("Derived pools: any pool with a pretrained model, its experts re-trained by a method that derives "
              f"pools ({', '.join(makers)}),\n  named POOL+METHOD or POOL+METHOD(param=value,...): e.g. "
              f"{default}+{makers[0]}, {default}+{makers[0]}(lr=0.0001).\n"
              f"  Any pool name takes [task,...] to keep some tasks only: {default}[digits,rot90].\n")
    clashes, broken_commands = _command_problems(registry, getattr(args, "core_commands", ()))
    if registry.conflicts or clashes:
        print("Name conflicts (unusable until resolved):")
        for (kind, name), dists in registry.conflicts.items():
            print(f"  {kind} {name!r}: {', '.join(dists)}")
        for line in clashes:
            print(f"  {line}")
        print()
    if registry.broken or broken_commands:
        print("Broken plugins (failed to load):")
        for b in registry.broken:
            print(f"  {b.name} ({b.distribution}): {b.error}")
        for line in broken_commands:
            print(f"  {line}")
        return 1
    return 0


def _third_column(title: str) -> str:
    """The header of a table's third column: a method's kind and needs; for the rest, whether it is the default."""
    return "kind" if title == "Methods" else "default"


def _command_problems(registry: Registry, core: Collection[str]) -> tuple[list[str], list[str]]:
    """(commands named like a core command, commands whose options fail to build): the plugin commands that
    `mergebench NAME` cannot run, found without building the whole parser."""
    clashes, broken = [], []
    for name, reg in sorted(registry.commands.items()):
        if name in core:
            clashes.append(core_clash(reg))
            continue
        try:
            command_options(reg)
        except PluginError as exc:
            broken.append(str(exc))
    return clashes, broken


def _list_pool_params(registry: Registry) -> None:
    """Each pool's parameters with their types and defaults, and how to set them."""
    from mergebench_core.pools.params import describe_params

    rows = [(name, describe_params(reg.params)) for name, reg in sorted(registry.modelpools.items()) if reg.params]
    if not rows:
        return
    print("Model pool parameters: NAME(key=value,...), or pool.key=value for every selected pool that has it:")
    for name, described in rows:
        print(f"  {name}: {described}")
    print()


def _list_taskpool_params(registry: Registry) -> None:
    """Task pools that take parameters (`lmeval(tasks=...)`), with their types and defaults."""
    from mergebench_core.pools.params import describe_params

    rows = [(name, describe_params(reg.params)) for name, reg in sorted(registry.taskpools.items()) if reg.params]
    if rows:
        print("Task pool parameters: --taskpool \"NAME(key=value,...)\":")
        for name, described in rows:
            print(f"  {name}: {described}")
        print()


def add_parser(sub: Any) -> None:
    """The `list` command."""
    lst = sub.add_parser("list", help="list installed methods, model pools, task pools and plugin commands")
    lst.set_defaults(func=cmd_list)
