"""The `mergebench` command line: run | merge | download | convert | list | leaderboard | show."""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mergebench_core import __version__
from mergebench_core.contract.config import build_params, check_overrides_used, parse_overrides, split_top_level
from mergebench_core.errors import MergebenchError
from mergebench_core.results.leaderboard import FORMATS, render
from mergebench_core.paths import default_store
from mergebench_core.contract.registry import get_registry

T = TypeVar("T")
log = logging.getLogger("mergebench")


def _progress(iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterator[T]:
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, leave=False, disable=None, file=sys.stderr))


def _split(values: Sequence[str] | None) -> list[str] | None:
    """Comma-separated names, commas inside brackets kept: `-p 'a+finetune(lr=1,steps=2)[x,y],b'` is two pools."""
    if not values:
        return None
    return [v.strip() for item in values for v in split_top_level(item) if v.strip()]


def _preferences(args: argparse.Namespace) -> Any:
    from mergebench_core.preferences.vectors import PreferenceRequest, parse_simplex, parse_vector

    vectors = tuple(parse_vector(v) for v in args.preference or [])
    grids = tuple(parse_simplex(g) for g in args.preferences or [])
    return PreferenceRequest(vectors, grids)


def _seeds(values: Sequence[str] | None) -> list[int]:
    seeds = []
    for s in _split(values) or ["0"]:
        try:
            seeds.append(int(s))
        except ValueError:
            raise MergebenchError(f"--seed {s!r} is not an integer; write --seed 0 or --seed 0,1,2") from None
    return seeds


def cmd_run(args: argparse.Namespace) -> int:
    from mergebench_core.running.runner import Runner, RunOptions
    from mergebench_core.results.store import ResultStore

    registry = get_registry()
    options = RunOptions(methods=_split(args.method), modelpools=_split(args.modelpool), taskpool=args.taskpool,
                         overrides=args.overrides, config_file=args.config, seeds=_seeds(args.seed),
                         limit=args.limit, device=args.device, rerun=args.rerun, batch_size=args.batch_size,
                         dtype=args.dtype, trust_pickle=_trust_pickle(args), tasks=_split(args.tasks),
                         preferences=_preferences(args), eval_only=args.eval_only, loggers=_split(args.logger) or (),
                         jobs=args.jobs, cell_timeout=args.cell_timeout, isolation=args.isolation,
                         executor=args.executor, ray_address=args.ray_address, bn_stats=args.bn_stats)
    if options.isolation == "process" and options.executor == "local":
        from mergebench_core.running.executors import reserve_threads_for_workers

        reserve_threads_for_workers()  # before anything is computed: see its docstring
    runner = Runner(registry, None, options, progress=_progress)  # an unknown logger is refused here
    cells = runner.plan()  # every name, parameter, task and preference is checked before any work starts
    runner.store = ResultStore(args.store)  # opened only now: a refused run writes nothing
    log.info("%d cells planned; results go to %s", len(cells), args.store)
    report = runner.run(cells)
    print(render(report.results, args.format, columns=_split(args.columns), per_seed=args.per_seed))
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


def cmd_merge(args: argparse.Namespace) -> int:
    from mergebench_core.engine.merging import checkpoint_task_names, file_merge_refusal, merge_sources
    from mergebench_core.engine.tensors import SafetensorsSource, StreamingSafetensorsWriter, copy_side_files

    registry = get_registry()
    method_cls = registry.method(args.method)
    refusal = file_merge_refusal(method_cls)
    if refusal:
        raise MergebenchError(refusal)
    overrides = parse_overrides(args.overrides)
    check_overrides_used(overrides, {method_cls.name: method_cls.Params})
    configs = build_params(method_cls.name, method_cls.Params, None, overrides)
    if len(configs) != 1:
        raise MergebenchError("`mergebench merge` takes one value per parameter; sweeps belong to `mergebench run`")
    method = method_cls(configs[0])
    names = checkpoint_task_names(args.models, _split(args.task_names))
    chosen = method.select_experts(names)  # e.g. slerp.models=[a,b] picks two of the files by name
    per_task = method_cls.info.task_specific
    out = Path(args.out)
    if per_task and out.suffix == ".safetensors":
        raise MergebenchError(f"{method_cls.name} builds one model per task: give --out a folder, which will hold "
                              f"{', '.join(f'{n}.safetensors' for n in chosen)}")
    base = SafetensorsSource(args.base) if args.base else None
    experts = [SafetensorsSource(args.models[names.index(n)]) for n in chosen]
    out_files = [out / f"{n}.safetensors" for n in chosen] if per_task else \
        [out if out.suffix == ".safetensors" else out / "model.safetensors"]
    ref = base or experts[0]
    layout = [(k, ref.shape(k), ref.dtype(k)) for k in ref.keys()]
    metadata = {"format": "pt", "mergebench_method": method_cls.name,
                "mergebench_params": json.dumps(configs[0].__dict__, default=str)}
    writers = [StreamingSafetensorsWriter(f, layout, dict(metadata, **({"mergebench_task": n} if per_task else {})))
               for f, n in zip(out_files, chosen)]
    try:
        merge_sources(method, base, experts, sink=writers if per_task else writers[0], seed=args.seed,
                      progress=_progress, device=_merge_device(args.device), prefetch=args.prefetch,
                      block_entries=max(1, int(args.block_mb * (1 << 20)) // 4), bn_stats=args.bn_stats)
        for w in writers:
            w.commit()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    if out.suffix != ".safetensors" and base is not None and base.path.is_dir():
        for line in copy_side_files(base.path, out):  # configs and tokenizers travel with the weights
            print(f"not copied: {line}", file=sys.stderr)
    what = ", ".join(str(f) for f in out_files) if per_task else str(out_files[0])
    print(f"wrote {what} ({method_cls.name}, {len(experts)} models)")
    return 0


def _merge_device(name: str) -> str:
    """`merge --device`: cpu, cuda, cuda:N; a GPU that is not there is a clear error, not a traceback."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MergebenchError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    return name


def _trust_pickle(args: argparse.Namespace) -> bool:
    import os

    from mergebench_core.engine.tensors import TRUST_PICKLE_ENV

    return bool(getattr(args, "trust_pickle", False)) or \
        os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def cmd_download(args: argparse.Namespace) -> int:
    """Prefetch every model and dataset of the named model pools and of their task pools."""
    from mergebench_core.running.runner import Runner, RunOptions
    from mergebench_core.results.store import ResultStore

    registry = get_registry()
    pools = _split(args.modelpool) or []
    runner = Runner(registry, ResultStore(":memory:"), RunOptions(modelpools=pools, taskpool=args.taskpool,
                                                                   trust_pickle=_trust_pickle(args)))

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


def cmd_convert(args: argparse.Namespace) -> int:
    """Turn pickle checkpoints into safetensors once, so later runs never unpickle."""
    from mergebench_core.engine.tensors import convert_pickle_checkpoint

    trust = _trust_pickle(args)
    if args.modelpool:
        from mergebench_core.pools.params import make_pool
        from mergebench_core.pools.views import PoolName

        parsed = PoolName.parse(args.modelpool)
        pool = make_pool(get_registry().modelpool(parsed.base), parsed)
        convert = getattr(pool, "convert", None)
        if convert is None:
            raise MergebenchError(f"model pool {args.modelpool!r} has nothing to convert")
        pool.configure(trust_pickle=trust)
        for written in convert():
            print(f"wrote {written}")
    for path in args.paths:
        print(f"wrote {convert_pickle_checkpoint(path, trust_pickle=trust)}")
    if not args.modelpool and not args.paths:
        raise MergebenchError("name checkpoint files or --modelpool to convert")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from mergebench_core.training.methods import TrainingMethod

    registry = get_registry()
    for title, table in (("Methods", registry.methods), ("Model pools", registry.modelpools),
                         ("Task pools", registry.taskpools), ("Loggers", registry.loggers)):
        if title == "Loggers" and not table:
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
        print(tabulate(rows, headers=["name", "provided by", "", "description"], tablefmt="simple")
              if rows else "  (none installed)")
        print()
        if title == "Model pools":
            _list_pool_params(registry)
    makers = sorted(n for n, r in registry.methods.items()
                    if issubclass(r.obj, TrainingMethod) and r.obj.produces == "pool")
    if makers:
        default = next((n for n, r in sorted(registry.modelpools.items()) if r.default), "POOL")
        print("Derived pools: any pool with a pretrained model, its experts re-trained by a method that derives "
              f"pools ({', '.join(makers)}),\n  named POOL+METHOD or POOL+METHOD(param=value,...): e.g. "
              f"{default}+{makers[0]}, {default}+{makers[0]}(lr=0.0001).\n"
              f"  Any pool name takes [task,...] to keep some tasks only: {default}[digits,rot90].\n")
    if registry.conflicts:
        print("Name conflicts (unusable until resolved):")
        for (kind, name), dists in registry.conflicts.items():
            print(f"  {kind} {name!r}: {', '.join(dists)}")
        print()
    if registry.broken:
        print("Broken plugins (failed to load):")
        for b in registry.broken:
            print(f"  {b.name} ({b.distribution}): {b.error}")
        return 1
    return 0


def _list_pool_params(registry: Any) -> None:
    """Each pool's parameters with their types and defaults, and how to set them."""
    from mergebench_core.pools.params import describe_params

    rows = [(name, describe_params(reg.params)) for name, reg in sorted(registry.modelpools.items()) if reg.params]
    if not rows:
        return
    print("Model pool parameters: NAME(key=value,...), or pool.key=value for every selected pool that has it:")
    for name, described in rows:
        print(f"  {name}: {described}")
    print()


def _pool_filter(name: str | None) -> str | None:
    """`-p NAME(k=v)` of leaderboard, show and plot in the stored (canonical) spelling, so `lr=3e-5` finds the rows of
    `lr=3e-05`; plain names need no plugins loaded."""
    if not name or "(" not in name:
        return name
    from mergebench_core.pools.params import canonical_filter

    return canonical_filter(get_registry(), name)


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

        text = render_pareto(results, args.format)
    else:
        text = render(results, args.format, columns=_split(args.columns), per_seed=args.per_seed,
                      history=args.history)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from mergebench_core.errors import normalize_name
    from mergebench_core.running.loggers import log_path, read_log
    from mergebench_core.results.store import ResultStore

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
    from mergebench_core.results import plots
    from mergebench_core.errors import normalize_name
    from mergebench_core.results.store import ResultStore

    args.modelpool = _pool_filter(args.modelpool)
    if not Path(args.store).exists():
        raise MergebenchError(f"no results store at {args.store}; run `mergebench run` first or pass --store")
    results = ResultStore(args.store, readonly=True).all(args.modelpool, args.taskpool)
    out = args.out or f"{args.kind}.png"
    methods = _split(args.method)
    where = {"modelpool": args.modelpool, "taskpool": args.taskpool}
    if args.kind == "pareto":
        if methods:
            wanted = {normalize_name(m) for m in methods}
            results = [r for r in results if r.kind == "reference" or r.method in wanted]
        written = plots.pareto_figure(results, out, modelpool=args.modelpool)
    elif args.kind == "tasks":
        written = plots.tasks_figure(results, out, methods=methods, **where)
    elif args.kind == "time":
        written = plots.time_figure(results, out, methods=methods, score=args.score, **where)
    else:
        written = plots.sweep_figure(results, out, param=args.param, methods=methods, score=args.score, **where)
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_mergeability(args: argparse.Namespace) -> int:
    """Regularised fine-tuning recipes, their experts merged with held-out partners, and the stability analysis."""
    from mergebench_core.mergeability import command

    return command(args, progress=_progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergebench", description="Benchmark deep model merging and fusion.")
    parser.add_argument("--version", action="version", version=f"mergebench {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-vv: debug logging from every library (mergebench's own progress shows by default)")
    parser.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbose",
                        help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run methods against model pools and store the results")
    run.add_argument("--method", "-m", action="append", help="method name(s), comma-separated; default: all")
    run.add_argument("--modelpool", "-p", action="append", help="model pool(s), comma-separated; default: the "
                     "pools marked default. NAME(key=value,...) sets pool parameters")
    run.add_argument("--taskpool", help="score with this task pool instead of each pool's default")
    run.add_argument("--config", help="YAML file with `method:`, `<method name>:` and `modelpool:` sections")
    run.add_argument("--seed", action="append", help="seed(s), comma-separated (default 0)")
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

    merge = sub.add_parser("merge", help="merge checkpoint files with a data-free method")
    merge.add_argument("--method", "-m", required=True)
    merge.add_argument("--base", help="the pretrained checkpoint (.safetensors file, index or model folder)")
    merge.add_argument("--models", nargs="+", required=True, help="the expert checkpoints")
    merge.add_argument("--out", required=True, help="output .safetensors file, or a folder (methods with one model "
                       "per task, emr and tall_masks, write <task>.safetensors into it)")
    merge.add_argument("--task-names", action="append", metavar="A,B,...",
                       help="a name per model, in order (default: each model's file or folder name); they name "
                            "per-task outputs and are what slerp.models=[a,b] refers to")
    merge.add_argument("--seed", type=int, default=0)
    merge.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, or auto: where blocks are "
                       "merged; the inputs are read on the host either way")
    merge.add_argument("--block-mb", type=float, default=16.0, metavar="MIB",
                       help="MiB of float32 per model in one block (default 16): element-wise methods stream tensors "
                            "larger than this in blocks, so peak memory is about this times the number of models")
    merge.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                       help="read the next block while this one is merged (default: on with a GPU, off on a CPU)")
    merge.add_argument("--bn-stats", choices=["base", "mean"], default="mean",
                       help="batch-norm running statistics (found by name): the base's, or the experts' mean "
                            "(default)")
    merge.add_argument("overrides", nargs="*", help="parameter overrides: method.x=1")
    merge.set_defaults(func=cmd_merge)

    dl = sub.add_parser("download", help="prefetch every model and dataset of model pools and their task pools")
    dl.add_argument("--modelpool", "-p", action="append", required=True, help="model pool(s), comma-separated")
    dl.add_argument("--taskpool", help="fetch this task pool's data instead of each pool's default")
    dl.set_defaults(func=cmd_download)

    conv = sub.add_parser("convert", help="convert pickle checkpoints (.pt/.bin) to safetensors, once")
    conv.add_argument("paths", nargs="*", help="checkpoint files; each gets a .safetensors beside it")
    conv.add_argument("--modelpool", "-p", help="convert every checkpoint of this pool (pools that read pickles)")
    conv.add_argument("--trust-pickle", action="store_true",
                      help="allow full unpickling (runs code from the file; only for files you trust)")
    conv.set_defaults(func=cmd_convert)

    lst = sub.add_parser("list", help="list installed methods, model pools and task pools")
    lst.set_defaults(func=cmd_list)

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
    lb.add_argument("--out", help="write the output to this file instead of printing it (e.g. board.html)")
    lb.set_defaults(func=cmd_leaderboard)

    plot = sub.add_parser("plot", help="draw figures from stored results (needs matplotlib: mergebench[plot])")
    plot.add_argument("kind", choices=["pareto", "tasks", "time", "sweep"],
                      help="pareto: each method's preference front, per pair of tasks; tasks: per-task bars; "
                           "time: score against merge time; sweep: score against one parameter, seed error bars")
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

    from mergebench_core.mergeability import add_arguments as mergeability_arguments

    mergeability = sub.add_parser("mergeability", help="do experts fine-tuned with mergeability regularisers merge "
                                  "better? recipes, merges with held-out partners, and the stability analysis")
    mergeability_arguments(mergeability)
    mergeability.set_defaults(func=cmd_mergeability)
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
    parser = build_parser()
    args: Any = parser.parse_args(argv)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
