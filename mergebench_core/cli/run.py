"""`mergebench run`: methods × model pools × seeds × preferences as cells, stored, then printed as a table."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import mergebench_core.contract.registry as registry_module
from mergebench_core.cli.arguments import parse_seeds, split_names, trust_pickle
from mergebench_core.cli.progress import progress_bar
from mergebench_core.paths import default_store
from mergebench_core.results.leaderboard import FORMATS, render

log = logging.getLogger("mergebench")


def _preferences(args: argparse.Namespace) -> Any:
    from mergebench_core.preferences.vectors import PreferenceRequest, parse_simplex, parse_vector

    vectors = tuple(parse_vector(v) for v in args.preference or [])
    grids = tuple(parse_simplex(g) for g in args.preferences or [])
    return PreferenceRequest(vectors, grids)


def _task_orders(args: argparse.Namespace) -> tuple[int, ...]:
    from mergebench_core.running.task_order import order_seeds

    return order_seeds(args.task_orders, parse_seeds(args.task_order) if args.task_order else None)


def cmd_run(args: argparse.Namespace) -> int:
    from mergebench_core.results.store import ResultStore
    from mergebench_core.running.runner import Runner, RunOptions

    registry = registry_module.get_registry()
    options = RunOptions(methods=split_names(args.method), modelpools=split_names(args.modelpool),
                         taskpool=args.taskpool, overrides=args.overrides, config_file=args.config,
                         seeds=parse_seeds(args.seed), limit=args.limit, device=args.device, rerun=args.rerun,
                         batch_size=args.batch_size, dtype=args.dtype, trust_pickle=trust_pickle(args),
                         tasks=split_names(args.tasks), preferences=_preferences(args), eval_only=args.eval_only,
                         loggers=split_names(args.logger) or (), jobs=args.jobs, cell_timeout=args.cell_timeout,
                         isolation=args.isolation, executor=args.executor, ray_address=args.ray_address,
                         bn_stats=args.bn_stats, task_orders=_task_orders(args))
    if options.isolation == "process" and options.executor == "local":
        from mergebench_core.running.executors import reserve_threads_for_workers

        reserve_threads_for_workers()  # before anything is computed: see its docstring
    runner = Runner(registry, None, options, progress=progress_bar)  # an unknown logger is refused here
    cells = runner.plan()  # every name, parameter, task and preference is checked before any work starts
    runner.store = ResultStore(args.store)  # opened only now: a refused run writes nothing
    log.info("%d cells planned; results go to %s", len(cells), args.store)
    report = runner.run(cells)
    print(render(report.results, args.format, columns=split_names(args.columns), per_seed=args.per_seed))
    for line in report.not_applicable:
        print(f"(not run: {line})", file=sys.stderr)
    for line in report.notes:
        print(f"(note: {line})", file=sys.stderr)
    if report.skipped:
        print(f"\n({report.skipped} cells reused from {args.store}; --rerun recomputes them)", file=sys.stderr)
    if report.failed:
        print(f"\n{len(report.failed)} cell(s) failed; their errors are stored in {args.store} "
              f"(`mergebench show --failed`).", file=sys.stderr)
    if report.interrupted:
        print(f"\ninterrupted: {report.interrupted} row(s) not computed; the same command computes them",
              file=sys.stderr)
        return 130
    return 1 if report.failed or report.unwritten else 0


def add_parser(sub: Any) -> None:
    """The `run` command and its options."""
    run = sub.add_parser("run", help="run methods against model pools and store the results")
    run.add_argument("--method", "-m", action="append", help="method name(s), comma-separated; default: all")
    run.add_argument("--modelpool", "-p", action="append", help="model pool(s), comma-separated; default: the "
                     "pools marked default. NAME(key=value,...) sets pool parameters")
    run.add_argument("--taskpool", help="score with this task pool instead of each pool's default")
    run.add_argument("--config", help="YAML file with `method:`, `<method name>:` and `modelpool:` sections")
    run.add_argument("--seed", action="append", help="seed(s), comma-separated (default 0)")
    run.add_argument("--task-orders", type=int, metavar="N",
                     help="continual methods: run each in N task orders (0: the pool's order, k: a permutation "
                          "seeded by k); tables average over them (default 1)")
    run.add_argument("--task-order", action="append", metavar="K,...",
                     help="continual methods: these task order seeds (with or instead of --task-orders)")
    run.add_argument("--tasks", action="append",
                     help="restrict every pool to these tasks (their experts, and scoring on them), comma-separated")
    run.add_argument("--preference", action="append", metavar="R1,R2,...",
                     help="a preference over the pool's tasks for preference-aware methods (repeatable)")
    run.add_argument("--preferences", action="append", metavar="simplex:K",
                     help="a grid of K points per edge of the simplex over the tasks, vertices included")
    run.add_argument("--eval-only", action="store_true",
                     help="never train: score cached trained models, refusing the run if one is missing")
    run.add_argument("--jobs", "-j", type=int, default=1, help="cells at once, each in its own worker (default 1)")
    run.add_argument("--cell-timeout", type=float, metavar="SECONDS",
                     help="stop a cell that runs longer and store it as failed (reason: timeout)")
    run.add_argument("--isolation", default="process", choices=["process", "none"],
                     help="process (default): each cell in a fresh worker process; none: in this process (debuggers)")
    run.add_argument("--executor", default="local", choices=["local", "ray"],
                     help="local worker processes, or Ray tasks (pip install 'mergebench[ray]')")
    run.add_argument("--ray-address", help="the Ray cluster to use with --executor ray (default: a local Ray)")
    run.add_argument("--logger", action="append",
                     help="also send training curves to these registered loggers (JSON lines are always written)")
    run.add_argument("--bn-stats", choices=["base", "mean", "recompute"],
                     help="batch-norm running statistics of merged models: the pretrained model's, the experts' mean "
                          "(default), or recomputed on the tasks' training data (pools with BatchNorm only)")
    run.add_argument("--limit", type=int, help="score only the first N test examples of each task")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    run.add_argument("--batch-size", type=int, default=256)
    run.add_argument("--rerun", action="store_true", help="recompute cells already in the store")
    run.add_argument("--dtype", help="load models in this dtype where the pool supports it (float32, bfloat16, ...)")
    run.add_argument("--trust-pickle", action="store_true",
                     help="allow pools to unpickle checkpoints (runs code from the file; only for files you trust)")
    run.add_argument("--store", default=str(default_store()), help="results database (SQLite)")
    run.add_argument("--format", default="github", choices=FORMATS)
    run.add_argument("--columns", action="append", metavar="COL,...",
                     help="the table's columns, as for `leaderboard --columns` (e.g. --columns=-merge,-mem)")
    run.add_argument("--per-seed", action="store_true", help="one row per seed instead of mean ± std over seeds")
    run.add_argument("overrides", nargs="*", help="parameter overrides: method.x=1 or <method>.x=1,2,3 (sweep); "
                     "pool.x=1 for model pool parameters")
    run.set_defaults(func=cmd_run)
