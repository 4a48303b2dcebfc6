"""Subcommands that plugins add through the `register_commands` hook, put beside the core's on the `mergebench`
parser. Each is checked on its own, so one plugin's mistake never takes the command line down: a command whose
options fail to build, or whose name two plugins register, stays listed in `--help` but only explains itself when
chosen, and a plugin command named like a core command is left out (the core's runs)."""

from __future__ import annotations

import argparse
import logging
import traceback
from collections.abc import Collection
from functools import partial
from typing import Any

from mergebench_core.contract.api import Registration
from mergebench_core.contract.commands import Command
from mergebench_core.contract.registry import Registry
from mergebench_core.errors import MergebenchError, PluginError

log = logging.getLogger(__name__)


def _plugin(reg: Registration) -> str:
    return f"plugin {reg.plugin!r}" + (f" ({reg.distribution})" if reg.distribution else "")


def command_options(reg: Registration) -> argparse.ArgumentParser:
    """The command's options on a parser of their own, later handed to its subparser as a parent: when the plugin's
    `arguments` raises, nothing of it has reached the `mergebench` parser."""
    parser = argparse.ArgumentParser(add_help=False)
    command: Command = reg.obj
    if command.arguments is not None:
        try:
            command.arguments(parser)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - whatever it raises (argparse's SystemExit too) is its bug
            error = "".join(traceback.format_exception_only(exc)).strip()
            raise PluginError(f"{_plugin(reg)}: command {reg.name!r} failed while adding its options: "
                              f"{error}") from None
    return parser


def core_clash(reg: Registration) -> str:
    """Why a plugin command named like a core command is left out."""
    return (f"{_plugin(reg)} registers the command {reg.name!r}, which is a core command; the core's runs, and the "
            f"plugin's cannot be reached until the plugin renames it")


def run_command(command: Command, args: argparse.Namespace) -> int:
    """Calls the plugin's `run`; None (no return statement) is success."""
    status = command.run(args)
    return 0 if status is None else int(status)


def _refuse(reason: str, args: argparse.Namespace) -> int:
    raise PluginError(reason)


def _add_unusable(sub: Any, name: str, reason: str) -> None:
    """A subparser that takes any words and explains why the command cannot run. Its options are prefixed by a
    character no command line contains, so every word after the name (`--help` too) reaches the explanation instead
    of an argparse usage error."""
    parser = sub.add_parser(name, help="(unusable: `mergebench list` says why)", add_help=False, prefix_chars="\0")
    parser.add_argument("words", nargs="*")
    parser.set_defaults(func=partial(_refuse, reason))


def add_plugin_commands(sub: Any, registry: Registry) -> None:
    """Adds every command the plugins registered to `sub` (argparse's subparsers action), after the core's."""
    core: Collection[str] = set(sub.choices)
    for name, reg in sorted(registry.commands.items()):
        if name in core:
            log.warning("%s", core_clash(reg))
            continue
        try:
            options = command_options(reg)
        except PluginError as exc:
            log.warning("%s", exc)
            _add_unusable(sub, name, f"{exc}; the command cannot run until the plugin is fixed")
            continue
        parser = sub.add_parser(name, parents=[options], help=reg.description, description=reg.description)
        parser.set_defaults(func=partial(run_command, reg.obj))
    for (kind, name), _ in sorted(registry.conflicts.items()):
        if kind == "command" and name not in core:
            try:
                registry.command(name)  # raises the registry's own message for a conflicted name
            except MergebenchError as exc:
                _add_unusable(sub, name, str(exc))
