"""The `mergebench` command line: the parser (the core's commands, then the plugins'), logging, and one place that
turns errors into exit statuses. Each core command lives in a module of its own beside this one."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import mergebench_core.cli.convert as convert_command
import mergebench_core.cli.download as download_command
import mergebench_core.cli.listing as list_command
import mergebench_core.cli.merge as merge_command
import mergebench_core.cli.results as results_commands
import mergebench_core.cli.run as run_command
import mergebench_core.contract.registry as registry_module
from mergebench_core import __version__
from mergebench_core.cli.plugin_commands import add_plugin_commands
from mergebench_core.errors import MergebenchError

log = logging.getLogger("mergebench")

CORE_COMMANDS = (run_command, merge_command, download_command, convert_command, list_command, results_commands)
"""The modules of the core's commands, in the order `--help` lists them; each has `add_parser(subparsers)`."""


def _named_command(argv: Sequence[str]) -> str | None:
    """The first word that is not an option (the top-level options take no values): the command's name."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `mergebench`. With `argv` naming a core command, plugin commands are left out: finding them
    loads every plugin (seconds with torch-heavy ones), which `leaderboard` or `show` would pay for nothing."""
    parser = argparse.ArgumentParser(prog="mergebench", description="Benchmark deep model merging and fusion.")
    parser.add_argument("--version", action="version", version=f"mergebench {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-vv: debug logging from every library (mergebench's own progress shows by default)")
    parser.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbose",
                        help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in CORE_COMMANDS:
        module.add_parser(sub)
    parser.set_defaults(core_commands=tuple(sub.choices))  # for `list`, which reports plugin commands that clash
    if argv is None or _named_command(argv) not in sub.choices:
        try:
            registry = registry_module.get_registry()
        except Exception as exc:  # noqa: BLE001 - the core's commands must stay usable (`list` reports it again)
            log.warning("plugin commands are not available: %s: %s", type(exc).__name__, exc)
        else:
            add_plugin_commands(sub, registry)
    return parser


def _configure_logging(verbose: int) -> None:
    """mergebench's own progress (pool builds, cells) at INFO; other libraries only from WARNING, or with -vv."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if verbose < 2:
        ours = logging.INFO if verbose >= 0 else logging.WARNING
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or (r.name.startswith("mergebench")
                                                                     and r.levelno >= ours))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)


def _keep_freed_memory() -> None:
    """Let glibc reuse freed tensor memory instead of handing it back to the kernel after every tensor.

    A merge allocates and frees buffers of tens of MB per tensor. glibc serves blocks that large with fresh mmaps
    and unmaps them on free, so every tensor pays page faults again: measured on 8 CLIP-B/32-sized experts, that
    doubled `mergebench merge` with task arithmetic (9.6 s against 5.7 s) and TIES. Raising the mmap and trim
    thresholds keeps freed blocks in the heap for the next tensor; peak memory is unchanged, since a streaming
    merge's working set is the same from one tensor to the next. Only the CLI (the application) does this; other
    platforms simply skip it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        for option in (-3, -1):  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
            libc.mallopt(ctypes.c_int(option), ctypes.c_int(1 << 30))
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit status (2: bad input, 1: failure, 130: interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args: Any = build_parser(argv).parse_args(argv)
    _configure_logging(args.verbose)
    _keep_freed_memory()
    try:
        return args.func(args)
    except MergebenchError as exc:  # libraries' messages quoted inside may carry terminal colour codes: drop them
        print("error: " + re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every cell finished so far is in the store", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mergebench list | head`: the reader left; nothing is wrong with the command
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that flushing stdout at exit does not raise again
        return 0
    except Exception as exc:  # a bug or an environment problem: one line, the traceback on request
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}\n(unexpected; run again with --debug for the traceback)",
              file=sys.stderr)
        return 1


def entry() -> int:
    """The `mergebench` console script: `main`, in a process known to have computed nothing yet (so `run` may give
    torch's threads to its workers, see `executors.reserve_threads_for_workers`)."""
    from mergebench_core.running.executors import mark_fresh_process

    mark_fresh_process()
    return main()

