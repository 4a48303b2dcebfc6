"""What a plugin's `register_commands` hook registers: a `mergebench` subcommand, checked when it is registered.

The command line builds the subcommand's parser from it only when it needs plugin commands (see
`mergebench_core.cli.plugin_commands`), so registering one costs a plugin nothing but this small record.
"""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

from mergebench_core.errors import PluginError

COMMAND_NAME = re.compile(r"[a-z][a-z0-9_-]*\Z")
"""What a user can type without quoting, and what cannot be mistaken for an option."""


@dataclass(frozen=True)
class Command:
    """A subcommand: `mergebench NAME [arguments]` parses its options with `arguments(parser)` and calls
    `run(args)`, whose return value is the exit status (None is 0)."""

    run: Callable[[argparse.Namespace], int | None]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    help: str = ""


def make_command(plugin: str, name: object, run: object, arguments: object = None, help: object = "") -> Command:
    """The `Command` a `register(name, run, arguments=None, help="")` call describes, or a PluginError that names the
    plugin and what to change: a plugin's mistake is reported as its own when it loads, not as a user's later."""
    where = f"plugin {plugin!r}: command {name!r}"
    if not isinstance(name, str) or not COMMAND_NAME.match(name):
        raise PluginError(f"{where}: a command name is lower-case letters, digits, '-' and '_', starting with a "
                          f"letter")
    if not callable(run):
        raise PluginError(f"{where}: `run` must be a function taking the parsed arguments, got {run!r}")
    if arguments is not None and not callable(arguments):
        raise PluginError(f"{where}: `arguments` must be a function taking an argparse parser, got {arguments!r}")
    if not isinstance(help, str):
        raise PluginError(f"{where}: `help` must be a string, got {help!r}")
    summary = help or (inspect.getdoc(run) or "").split("\n\n")[0].replace("\n", " ")
    return Command(run, arguments, summary)  # type: ignore[arg-type]  # checked callable above
