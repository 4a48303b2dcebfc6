"""`mergebench mergeability`: the experiment from the command line, added by this plugin's `register_commands`
hook. `add_arguments` runs whenever the command line is built with plugin commands, so the runner, the store and
the experiment's run are imported only once `command` runs."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergebench_core import ConfigError, MergebenchError
from mergebench_core.paths import default_store
from mergebench_mergeability.experiment import DEFAULT_METHODS
from mergebench_mergeability.features import FEATURES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `mergebench mergeability`."""
    parser.add_argument("--modelpool", "-p", help="the pool whose experts are re-fine-tuned (default: the default "
                        "pool); it needs a pretrained model")
    parser.add_argument("--recipes", action="append", help="comma-separated, from baseline, moderate_update (R2), "
                        "grad_magnitude (R3), moderate_update_grad_magnitude (R2+R3); default: all four")
    parser.add_argument("--method", "-m", action="append",
                        help=f"merge methods, comma-separated (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--partners", "-k", type=int, default=3, help="held-out partners per expert (default 3)")
    parser.add_argument("--seed", action="append", help="partner-draw seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--tasks", action="append", help="only the experts of these tasks take part")
    parser.add_argument("--preset", help="a named training recipe of the trainer (mergeability: embedded, clip)")
    parser.add_argument("--trainer", default="mergeability", help="the training method deriving the recipes' pools")
    parser.add_argument("--analyze", action="store_true",
                        help="also the stability analysis: group features vs normalized accuracy, per method")
    parser.add_argument("--plot", help="with --analyze: write the coefficients per method to this .png/.svg/.pdf")
    parser.add_argument("--features", action="append", help=f"the regression's features, comma-separated, from "
                        f"{', '.join(FEATURES)} (default: all)")
    parser.add_argument("--grad-examples", type=int, default=256,
                        help="train examples per task for gradient_l2_distance (default 256)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--json", help="also write every number (draws, cells, features, regressions) to this file")
    parser.add_argument("--eval-only", action="store_true", help="never train: every recipe's experts must be cached")
    parser.add_argument("--limit", type=int, help="score only the first N test examples of each task")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rerun", action="store_true", help="recompute merge cells already in the store")
    parser.add_argument("--store", default=str(default_store()), help="results database (SQLite)")
    parser.add_argument("--format", default="github", choices=("github", "latex", "html"))
    parser.add_argument("overrides", nargs="*", help="mergeability.x=v sets a training parameter of every recipe "
                        "(e.g. mergeability.lambda_moderate_update=0.1); ties.x=v or method.x=v a merge parameter")


def _finite(value: Any) -> Any:
    """NaN and infinities as null, so the JSON file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _split(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def command(args: argparse.Namespace) -> int:
    """`mergebench mergeability`: exit 0, 1 if a cell failed; bad input raises (exit 2 in the CLI)."""
    from mergebench_core.cli.progress import progress_bar
    from mergebench_core.contract.config import parse_overrides
    from mergebench_core.contract.registry import get_registry
    from mergebench_core.errors import normalize_name
    from mergebench_core.pools.views import PoolName
    from mergebench_core.results.store import ResultStore
    from mergebench_core.running.runner import Runner, RunOptions
    from mergebench_mergeability.experiment import build_experiment, plan_experiment
    from mergebench_mergeability.report import coefficient_figure, render
    from mergebench_mergeability.running import run_experiment

    registry = get_registry()
    seeds = []
    for s in _split(args.seed) or []:
        try:
            seeds.append(int(s))
        except ValueError:
            raise ConfigError(f"--seed {s!r} is not an integer; write --seed 0,1,2") from None
    if args.grad_examples < 1 or args.bootstrap < 1:
        raise ConfigError("--grad-examples and --bootstrap must be at least 1")
    if args.plot and not args.analyze:
        raise ConfigError("--plot draws the stability analysis: add --analyze")
    features = _split(args.features) or list(FEATURES)
    unknown = [f for f in features if f not in FEATURES]
    if unknown or len(set(features)) != len(features):
        raise ConfigError(f"--features: unknown or repeated {', '.join(unknown) or ', '.join(features)}; "
                          f"features: {', '.join(FEATURES)}")
    trainer = normalize_name(args.trainer)
    overrides = parse_overrides(args.overrides)
    trainer_overrides = [o for o in overrides if o.target == trainer]
    merge_overrides = [item for item, o in zip(args.overrides, overrides) if o.target != trainer]
    if args.modelpool:
        parsed = PoolName.parse(args.modelpool)
        if parsed != PoolName(parsed.base, base_params=parsed.base_params):
            raise ConfigError(f"--modelpool {args.modelpool!r}: name a plain pool (parameters allowed); the recipes "
                              f"derive its pools and --tasks selects experts")
        from mergebench_core.pools.params import canonical_names

        (modelpool,) = canonical_names(registry, args.modelpool)
    else:
        defaults = [n for n, r in sorted(registry.modelpools.items()) if r.default]
        if not defaults:
            raise MergebenchError("no model pool is marked as default; pass --modelpool")
        modelpool = defaults[0]
    options = RunOptions(methods=None, modelpools=None, overrides=merge_overrides, seeds=(0,), limit=args.limit,
                         device=args.device, rerun=args.rerun, batch_size=args.batch_size, eval_only=args.eval_only)
    runner = Runner(registry, None, options, progress=progress_bar)
    exp = build_experiment(registry, runner.modelpool(modelpool), modelpool=modelpool,
                           recipes=_split(args.recipes), methods=_split(args.method), partners=args.partners,
                           seeds=seeds or None, tasks=_split(args.tasks), trainer=trainer, preset=args.preset,
                           trainer_overrides=trainer_overrides)
    plan = plan_experiment(exp, runner)  # every check before the store is opened: a refused run writes nothing
    rows = len(plan.groups) * len(exp.recipes)
    if args.analyze and rows < len(features) + 2:
        raise ConfigError(f"--analyze: the regression on {len(features)} features needs at least "
                          f"{len(features) + 2} merged groups, and this experiment has {rows} ({len(plan.groups)} "
                          f"distinct groups × {len(exp.recipes)} recipes); add seeds, experts or recipes")
    runner.store = ResultStore(args.store)
    result = run_experiment(exp, runner, plan, analyze=args.analyze, grad_examples=args.grad_examples,
                            bootstrap=args.bootstrap, features=features)
    print(render(result, args.format))
    if args.plot:
        print(f"wrote {coefficient_figure(result.regressions, args.plot, title=f'{modelpool}: merge stability')}")
    if args.json:
        Path(args.json).write_text(json.dumps(_finite(result.to_json()), indent=1, default=str))
        print(f"wrote {args.json}", file=sys.stderr)
    if result.reused:
        print(f"\n({result.reused} of {result.cells} merge cells reused from {args.store}; --rerun recomputes them)",
              file=sys.stderr)
    if result.failed:
        print(f"\n{len(result.failed)} cell(s) failed; their errors are stored in {args.store} "
              f"(`mergebench show --failed`).", file=sys.stderr)
        return 1
    return 0
