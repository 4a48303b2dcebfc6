"""`mergebench leaderboard`, `show` and `plot`: what the results store holds, as tables, JSON and figures. None of
them computes anything, and with plain pool names none loads a plugin."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import mergebench_core.contract.registry as registry_module
from mergebench_core.cli.arguments import split_names
from mergebench_core.errors import MergebenchError
from mergebench_core.paths import default_store
from mergebench_core.results.latex import FLOATS
from mergebench_core.results.leaderboard import FORMATS, render


def _pool_filter(name: str | None) -> str | None:
    """`-p NAME(k=v)` of leaderboard, show and plot in the stored (canonical) spelling, so `lr=3e-5` finds the rows of
    `lr=3e-05`; plain names need no plugins loaded."""
    if not name or "(" not in name:
        return name
    from mergebench_core.pools.params import canonical_filter

    return canonical_filter(registry_module.get_registry(), name)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from mergebench_core.results.store import ResultStore

    args.modelpool = _pool_filter(args.modelpool)
    if not Path(args.store).exists():
        raise MergebenchError(f"no results store at {args.store}; run `mergebench run` first or pass --store")
    results = ResultStore(args.store, readonly=True).all(args.modelpool, args.taskpool, history=args.history)
    if not results:
        print("no results stored yet")
        return 0
    if args.pareto:
        from mergebench_core.preferences.pareto import render_pareto
        from mergebench_core.results.tables import select_methods

        wanted = select_methods(split_names(args.method), [r.method for r in results if r.kind != "reference"])
        if wanted is not None:  # as `plot pareto` does: the references stay, other methods go
            results = [r for r in results if r.kind == "reference" or r.method in wanted]
        text = render_pareto(results, args.format)
    else:
        text = render(results, args.format, columns=split_names(args.columns), per_seed=args.per_seed,
                      history=args.history, methods=split_names(args.method), mark_costs=args.mark_costs,
                      latex_float=args.latex_float)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from mergebench_core.errors import normalize_name
    from mergebench_core.results.store import ResultStore
    from mergebench_core.running.loggers import log_path, read_log

    args.modelpool = _pool_filter(args.modelpool)
    if not Path(args.store).exists():
        raise MergebenchError(f"no results store at {args.store}")
    import time

    from mergebench_core.data.evaluation import primary_value

    rows = [r for r in ResultStore(args.store, readonly=True).all(args.modelpool, args.taskpool)
            if (not args.method or r.method == normalize_name(args.method))
            and (not args.failed or r.status != "ok")]
    shown: list[dict[str, Any]] = []
    for r in rows:
        cell: dict[str, Any] = {
            "cell_key": r.cell_key, "kind": r.kind, "method": r.method, "params": r.params,
            "modelpool": r.modelpool, "taskpool": r.taskpool, "seed": r.seed, "preference": r.preference,
            "eval_limit": r.eval_limit, "task_specific": r.task_specific, "status": r.status, "error": r.error,
            "scores": {t: primary_value(r.metrics, r.primary_metrics, t) for t in r.metrics},
            "primary_metrics": r.primary_metrics, "metrics": r.metrics, "mean": r.mean,
            "normalized_mean": r.normalized_mean, "merge_seconds": r.merge_seconds,
            "peak_memory_mb": r.peak_memory_mb, "eval_seconds": r.eval_seconds, "extras": r.extras,
            "versions": r.versions, "identity": getattr(r, "identity", None), "config": r.config,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.created_at))}
        if r.traceback and (args.failed or r.status != "ok"):
            cell["traceback"] = r.traceback.rstrip("\n").splitlines()
        curve = read_log(log_path(Path(args.store), r.cell_key))
        if curve:
            cell["training_log"] = {"file": str(log_path(Path(args.store), r.cell_key)), "steps": len(curve),
                                    "first": curve[0], "last": curve[-1]}
            if args.curves:
                cell["training_log"]["rows"] = curve
        shown.append(cell)
    print(json.dumps(shown, indent=2, default=str))  # one JSON document: a list of cells
    if not shown:
        which = "failed cells" if args.failed else "stored cells"
        filters = ", ".join(f"{k} {v}" for k, v in (("method", args.method), ("model pool", args.modelpool),
                                                    ("task pool", args.taskpool)) if v)
        print(f"no {which}{f' for {filters}' if filters else ''} in {args.store}", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from mergebench_core.errors import normalize_name
    from mergebench_core.results import plots
    from mergebench_core.results.store import ResultStore

    args.modelpool = _pool_filter(args.modelpool)
    if not Path(args.store).exists():
        raise MergebenchError(f"no results store at {args.store}; run `mergebench run` first or pass --store")
    results = ResultStore(args.store, readonly=True).all(args.modelpool, args.taskpool)
    out = args.out or f"{args.kind}.png"
    methods = split_names(args.method)
    where = {"modelpool": args.modelpool, "taskpool": args.taskpool}
    if args.kind == "pareto":
        if methods:
            wanted = {normalize_name(m) for m in methods}
            results = [r for r in results if r.kind == "reference" or r.method in wanted]
        written = plots.pareto_figure(results, out, modelpool=args.modelpool)
    elif args.kind == "tasks":
        written = plots.tasks_figure(results, out, methods=methods, **where)
    elif args.kind == "continual":
        written = plots.continual_figure(results, out, methods=methods, **where)
    elif args.kind == "time":
        written = plots.time_figure(results, out, methods=methods, score=args.score, **where)
    else:
        written = plots.sweep_figure(results, out, param=args.param, methods=methods, score=args.score, **where)
    for path in written:
        print(f"wrote {path}")
    return 0


def add_parser(sub: Any) -> None:
    """The `leaderboard`, `plot` and `show` commands and their options."""
    lb = sub.add_parser("leaderboard", help="print tables of stored results")
    lb.add_argument("--store", default=str(default_store()))
    lb.add_argument("--format", default="github", choices=FORMATS)
    lb.add_argument("--modelpool", "-p")
    lb.add_argument("--taskpool")
    lb.add_argument("--history", action="store_true",
                    help="also rows superseded by a newer run of the same setting (another pool recipe or plugin)")
    lb.add_argument("--pareto", action="store_true",
                    help="per (pool, method): points, non-dominated points and hypervolume of the preference front")
    lb.add_argument("--columns", action="append", metavar="COL,...",
                    help="the table's columns, in order: tasks (every task), a task's name, avg, norm, merge, mem, "
                         "eval; or only removals from the default, e.g. --columns=-merge,-mem")
    lb.add_argument("--per-seed", action="store_true", help="one row per seed instead of mean ± std over seeds")
    lb.add_argument("--method", "-m", action="append", metavar="NAME,...",
                    help="only these methods' rows, comma-separated; reference rows stay (with --pareto: only "
                         "these methods' fronts)")
    lb.add_argument("--mark-costs", action="store_true",
                    help="also mark the best merge time, memory and eval time, smallest first")
    lb.add_argument("--latex-float", choices=FLOATS, default="table*",
                    help="latex: table* (default) spans both columns of a two-column paper, table fits one")
    lb.add_argument("--out", help="write the output to this file instead of printing it (e.g. board.html)")
    lb.set_defaults(func=cmd_leaderboard)

    plot = sub.add_parser("plot", help="draw figures from stored results (needs matplotlib: mergebench[plot])")
    plot.add_argument("kind", choices=["pareto", "tasks", "time", "sweep", "continual"],
                      help="pareto: each method's preference front, per pair of tasks; tasks: per-task bars; "
                           "time: score against merge time; sweep: score against one parameter, seed error bars; "
                           "continual: score on the tasks seen after each arrival, over task orders")
    plot.add_argument("--out", help="output file: .png, .svg or .pdf (default KIND.png)")
    plot.add_argument("--method", "-m", action="append",
                      help="only these methods, comma-separated (tasks: default the best configurations)")
    plot.add_argument("--param", help="sweep: the parameter on the x axis (default: the one that varies)")
    plot.add_argument("--score", default="avg", help="time, sweep: avg (default), norm, or a task's name")
    plot.add_argument("--store", default=str(default_store()))
    plot.add_argument("--modelpool", "-p")
    plot.add_argument("--taskpool")
    plot.set_defaults(func=cmd_plot)

    show = sub.add_parser("show", help="show stored cells in full (parameters, learned values, errors)")
    show.add_argument("--store", default=str(default_store()))
    show.add_argument("--method", "-m")
    show.add_argument("--modelpool", "-p")
    show.add_argument("--taskpool")
    show.add_argument("--failed", action="store_true", help="only failed cells, with tracebacks")
    show.add_argument("--curves", action="store_true", help="print every logged training step")
    show.set_defaults(func=cmd_show)
