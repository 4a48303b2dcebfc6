"""Does a pool rank merging methods the same way when its experts are fine-tuned again with another seed?

`sensitivity.py` changes the experts' learning rate; this changes nothing but the seed of their fine-tuning (batch
order and dropout: the pool parameter `seed`, so each seed is a pool of its own in the store, `NAME(seed=1)`). The
same methods (default parameters, run seed 0) run on every pool at every expert seed. It prints each method's
average as mean ± std over the expert seeds with its rank at each seed, then, per pool, Spearman's ρ between the
rankings of every pair of seeds and their mean. A pool whose ranking holds at ρ near 1 across seeds gives
conclusions about methods; one near 0 gives conclusions about its experts' seeds.

    OMP_NUM_THREADS=1 python bench/seed_stability.py --store /tmp/seeds.sqlite     # digits and MiniLM, seeds 0-2
    python bench/seed_stability.py --pools digits-mlp_TA8,effnet-lite0-digits_TA8 --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import tempfile
from pathlib import Path

from mergebench_core.contract.registry import get_registry
from mergebench_core.results.store import ResultStore
from mergebench_core.running.runner import Runner, RunOptions

from sensitivity import CHEAP, averages, ranks, rho

POOLS = ("digits-mlp_TA8", "minilm_text8")


def seeded_names(pool: str, seeds: list[int]) -> list[str]:
    """The pool's stored name at each expert seed: seed 0 is the default, so it is the bare name."""
    params = get_registry().modelpool(pool).params
    if params is None or not hasattr(params(), "seed"):
        raise SystemExit(f"model pool {pool!r} has no `seed` parameter: its experts cannot be fine-tuned again by name")
    default = params().seed
    return [pool if seed == default else f"{pool}(seed={seed})" for seed in seeds]


def seed_correlations(per_seed: list[dict[str, float]]) -> list[tuple[int, int, float, int]]:
    """(i, j, ρ, methods in both) for every pair of seeds i < j."""
    return [(i, j, *rho(per_seed[i], per_seed[j])) for i, j in itertools.combinations(range(len(per_seed)), 2)]


def report(pool: str, seeds: list[int], per_seed: list[dict[str, float]]) -> list[str]:
    """One pool's table (mean ± std over seeds, rank at each seed) and its seed-to-seed correlations."""
    rank = [ranks(values) for values in per_seed]
    methods = sorted({m for values in per_seed for m in values},
                     key=lambda m: (-statistics.fmean(v[m] for v in per_seed if m in v), m))
    lines = [f"### {pool}", "", "| method | mean ± std | " + " | ".join(f"seed {s} (rank)" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for m in methods:
        values = [v[m] for v in per_seed if m in v]
        spread = f"{statistics.fmean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")
        cells = [f"{v[m]:.1f} ({r[m]})" if m in v else "" for v, r in zip(per_seed, rank)]
        lines.append(f"| {m} | {spread} | " + " | ".join(cells) + " |")
    pairs = seed_correlations(per_seed)
    finite = [r for _, _, r, _ in pairs if r == r]
    lines += ["", "| seeds | ρ | methods |", "|---|---|---|"]
    lines += [f"| {seeds[i]} vs {seeds[j]} | {r:.2f} | {n} |" for i, j, r, n in pairs]
    if finite:
        lines.append(f"| mean | {statistics.fmean(finite):.2f} | |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", default=",".join(POOLS), help="comma-separated model pools with a `seed` parameter")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated expert seeds")
    parser.add_argument("--methods", default=",".join(CHEAP), help="comma-separated methods, or `all`")
    parser.add_argument("--store", type=Path, help="results store to reuse (default: a fresh temporary one)")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    names = {pool: seeded_names(pool, seeds) for pool in pools}
    store_path = args.store or Path(tempfile.mkdtemp(prefix="mb-seeds-")) / "results.sqlite"
    methods = None if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    runner = Runner(get_registry(), None, RunOptions(
        methods=methods, modelpools=[name for pool in pools for name in names[pool]], jobs=args.jobs))
    cells = runner.plan()
    runner.store = ResultStore(store_path)
    runner.run(cells)

    store = ResultStore(store_path)
    print("Average accuracy (%) over expert seeds, and each seed's rank (1 = best)\n")
    summary = []
    for pool in pools:
        per_seed = [averages(store, name, methods) for name in names[pool]]
        print("\n".join(report(pool, seeds, per_seed)))
        finite = [r for _, _, r, _ in seed_correlations(per_seed) if r == r]
        summary.append((pool, statistics.fmean(finite) if finite else float("nan"), min(finite, default=float("nan"))))
    print("| pool | mean ρ between seeds | lowest ρ |")
    print("|---|---|---|")
    for pool, mean, low in summary:
        print(f"| {pool} | {mean:.2f} | {low:.2f} |")
    print(f"\nresults: {store_path}")


if __name__ == "__main__":
    main()
