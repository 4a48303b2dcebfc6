"""`mergebench download`: every model and dataset of some model pools and their task pools fetched once, so that
later runs work offline."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import mergebench_core.contract.registry as registry_module
from mergebench_core.cli.arguments import split_names, trust_pickle
from mergebench_core.errors import MergebenchError


def cmd_download(args: argparse.Namespace) -> int:
    """Prefetch every model and dataset of the named model pools and of their task pools."""
    from mergebench_core.results.store import ResultStore
    from mergebench_core.running.runner import Runner, RunOptions

    registry = registry_module.get_registry()
    pools = split_names(args.modelpool) or []
    runner = Runner(registry, ResultStore(":memory:"), RunOptions(modelpools=pools, taskpool=args.taskpool,
                                                                   trust_pickle=trust_pickle(args)))

    def progress(line: str) -> None:
        print(f"  fetching {line}", file=sys.stderr, flush=True)

    failures = []
    for name in runner.resolve_pool_names(pools):
        pool = runner.modelpool(name)
        taskpool = runner.taskpool(runner.taskpool_for(pool.name))
        print(f"{pool.name} (task pool {taskpool.name}):", file=sys.stderr)
        for what in (pool, taskpool):  # one failing pool does not hide what the others lack
            try:
                what.download(progress)
            except MergebenchError as exc:
                failures.append(f"{what.name}: {exc}")
    if failures:
        raise MergebenchError("some downloads failed:\n" + "\n".join(failures))
    print(f"done: {', '.join(pools)} and their task pools are in the local caches", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    """The `download` command and its options."""
    dl = sub.add_parser("download", help="prefetch every model and dataset of model pools and their task pools")
    dl.add_argument("--modelpool", "-p", action="append", required=True, help="model pool(s), comma-separated")
    dl.add_argument("--taskpool", help="fetch this task pool's data instead of each pool's default")
    dl.set_defaults(func=cmd_download)
