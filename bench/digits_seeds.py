"""Method ordering on the embedded pool across pool seeds: does a ranking hold beyond the one default build?

The embedded pool is small enough that one seed can flatter or hurt a method. This rebuilds `digits-mlp_TA8` with
`Recipe(seed=s)` for each seed (about 17 s each, single-threaded, cached under --root), evaluates the pretrained
model, each expert on its own task, and the chosen methods with their default parameters, and prints the average
accuracy per seed. Not part of the test suite.

    python bench/digits_seeds.py                         # seeds 0,1,2; TA, TIES, RegMean, Fisher, AdaMerging
    python bench/digits_seeds.py --seeds 0,1,2,3,4 --methods task_arithmetic,adamerging_lw
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_METHODS = "task_arithmetic,ties,regmean,fisher,adamerging_tw,adamerging_lw"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "mergebench-digits-seeds",
                        help="where the pools and statistics are cached")
    args = parser.parse_args()

    import torch
    from mergebench_digits import DigitsModelPool, DigitsTaskPool, Recipe
    from tabulate import tabulate

    from mergebench_core import PRETRAINED, RunContext
    from mergebench_core.data.evaluation import evaluate
    from mergebench_core.contract.registry import get_registry

    registry = get_registry()
    methods = [registry.method(name) for name in args.methods.split(",")]
    rows = []
    for seed in map(int, args.seeds.split(",")):
        recipe = Recipe(seed=seed)
        pool, tasks = DigitsModelPool(recipe, args.root), DigitsTaskPool(recipe, args.root)
        start = time.perf_counter()
        pool.folder  # builds the pool if it is not cached  # noqa: B018
        built = time.perf_counter() - start

        def average(scores: dict) -> float:
            return 100 * sum(v["accuracy"] for v in scores.values()) / len(scores)

        row = {"seed": seed, "pretrained": average(evaluate(tasks, pool.load_model(PRETRAINED)))}
        individual: dict = {}
        for task in tasks.tasks:
            individual.update(evaluate(tasks, pool.load_model(task), tasks=[task]))
        row["individual"] = average(individual)
        for cls in methods:
            torch.manual_seed(0)  # as the runner does for each cell
            ctx = RunContext(taskpool=tasks, seed=0, cache_dir=args.root / "ctx")
            row[cls.name] = average(evaluate(tasks, cls(cls.Params()).run(pool, ctx).model))
        rows.append(row)
        print(f"seed {seed}: pool ready in {built:.0f} s", file=sys.stderr)
    print(tabulate([[f"{v:.1f}" if isinstance(v, float) else v for v in r.values()] for r in rows],
                   headers=list(rows[0]), tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
