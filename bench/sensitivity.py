"""Which conclusions about merging methods survive another fine-tuning recipe, or another pool?

Runs a grid of methods (default parameters, seed 0) on each offline pool twice: with the experts fine-tuned at the
pool's own learning rate, and at that rate times `--factor` (the pool parameter `lr`, so the second setting is the
pool `NAME(lr=...)`, its own identity in the store). It prints every method's average accuracy and its rank in each
setting, then Spearman's rank correlation between settings: the same pool under both learning rates (is the ranking a
property of the methods, or of how the experts were trained?), the two pools at each rate, and each setting against
FusionBench's published CLIP-ViT-B/32 TA8 averages where a method has one. A correlation near 1 says a conclusion
drawn from one setting carries over; one near 0 says it is an accident of that setting.

Methods whose defaults are absolute step sizes (WUDI's `lr`, gradient matching's `delta0`) move most between pools:
their defaults were chosen for CLIP's weights. Their docstrings say so.

    python bench/sensitivity.py                               # both offline pools, 0.1x the learning rate
    python bench/sensitivity.py --pools digits-mlp_TA8 --methods task_arithmetic,ties,tsv_m --factor 0.3
    python bench/sensitivity.py --store /tmp/sens.sqlite      # keep (and reuse) the results

The default method list is every data-free merge plus the statistics-based ones (Fisher, RegMean, RegMean++), the
cheap part of the default grid; `--methods all` runs every installed method (hours on two CPU cores for the
EfficientNet pool: the training methods fine-tune a CNN per cell).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from mergebench_core.data.metrics import spearman
from mergebench_core.pools.params import format_value
from mergebench_core.contract.registry import get_registry
from mergebench_core.running.runner import Runner, RunOptions
from mergebench_core.results.store import ResultStore

from ranking_vs_fusionbench import PUBLISHED

POOLS = ("digits-mlp_TA8", "effnet-lite0-digits_TA8")
CHEAP = ("simple_average", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "consensus", "magmax", "tsv_m",
         "iso_c", "iso_cts", "wudi", "model_stock", "fisher", "regmean", "regmean_pp")


def settings(pools: list[str], factor: float) -> list[tuple[str, str, str]]:
    """(pool, label, pool name as stored) for each pool at its default learning rate and at `factor` times it."""
    registry = get_registry()
    out = []
    for pool in pools:
        params = registry.modelpool(pool).params
        if params is None or not hasattr(params(), "lr"):
            raise SystemExit(f"model pool {pool!r} has no `lr` parameter: it cannot be re-fine-tuned by name")
        lr = params().lr
        out.append((pool, f"lr {format_value(lr)}", pool))
        varied = float(f"{lr * factor:.6g}")  # 3e-05, not 2.9999999999999997e-05
        out.append((pool, f"lr {format_value(varied)}", f"{pool}(lr={format_value(varied)})"))
    return out


def averages(store: ResultStore, pool_name: str, methods: list[str] | None) -> dict[str, float]:
    """Average primary metric (%) per method on a pool, default parameters, seed 0 (only `methods`, when given)."""
    registry = get_registry()
    found: dict[str, float] = {}
    for r in store.all(pool_name):
        if r.status != "ok" or r.mean is None or r.seed != 0 or r.kind != "method" or r.method not in registry.methods:
            continue
        if methods is not None and r.method not in methods:
            continue
        if r.params != registry.methods[r.method].obj.Params().__dict__:
            continue
        found[r.method] = 100 * r.mean
    return found


def ranks(values: dict[str, float]) -> dict[str, int]:
    """1 = best; equal averages share the better rank."""
    ordered = sorted(values.values(), reverse=True)
    return {m: ordered.index(v) + 1 for m, v in values.items()}


def rho(a: dict[str, float], b: dict[str, float]) -> tuple[float, int]:
    common = sorted(set(a) & set(b))
    if len(common) < 3:
        return float("nan"), len(common)
    return float(spearman(torch.tensor([a[m] for m in common]), torch.tensor([b[m] for m in common]))), len(common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", default=",".join(POOLS), help="comma-separated model pools with an `lr` parameter")
    parser.add_argument("--factor", type=float, default=0.1, help="the second learning rate is the default times this")
    parser.add_argument("--methods", default=",".join(CHEAP), help="comma-separated methods, or `all`")
    parser.add_argument("--store", type=Path, help="results store to reuse (default: a fresh temporary one)")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    grid = settings([p.strip() for p in args.pools.split(",") if p.strip()], args.factor)
    store_path = args.store or Path(tempfile.mkdtemp(prefix="mb-sensitivity-")) / "results.sqlite"
    methods = None if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    runner = Runner(get_registry(), None, RunOptions(methods=methods, modelpools=[name for _, _, name in grid],
                                                     jobs=args.jobs))
    cells = runner.plan()
    runner.store = ResultStore(store_path)
    runner.run(cells)

    store = ResultStore(store_path)
    table = {name: averages(store, name, methods) for _, _, name in grid}
    references = {name: {r.method: 100 * r.mean for r in store.all(name)
                         if r.kind != "method" and r.status == "ok" and r.mean is not None} for _, _, name in grid}
    rank = {name: ranks(values) for name, values in table.items()}
    methods_seen = sorted({m for values in table.values() for m in values},
                          key=lambda m: (min(rank[name].get(m, 99) for name in table), m))
    header = [f"{pool} {label}" for pool, label, _ in grid]
    print("Average accuracy (%) and rank (1 = best) per setting\n")
    print("| method | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(header))
    for ref in ("pretrained", "individual"):
        print(f"| *{ref}* | " + " | ".join(f"{references[name][ref]:.1f}" if ref in references[name] else ""
                                           for _, _, name in grid) + " |")
    for m in methods_seen:
        cells_text = [f"{table[name][m]:.1f} ({rank[name][m]})" if m in table[name] else "" for _, _, name in grid]
        print(f"| {m} | " + " | ".join(cells_text) + " |")
    print("\nSpearman rank correlation (methods in both)\n")
    print("| between | and | ρ | methods |")
    print("|---|---|---|---|")
    pairs = [(i, i + 1) for i in range(0, len(grid), 2)]  # the same pool under both learning rates
    for j in (0, 1):  # the pools at each rate
        column = [i for i in range(len(grid)) if i % 2 == j]
        pairs += [(a, b) for k, a in enumerate(column) for b in column[k + 1:]]
    for a, b in pairs:
        r, n = rho(table[grid[a][2]], table[grid[b][2]])
        print(f"| {header[a]} | {header[b]} | {r:.2f} | {n} |")
    published = {m: v for m, v in PUBLISHED.items() if m not in ("pretrained", "individual")}
    for i, (_, _, name) in enumerate(grid):
        r, n = rho(table[name], published)
        print(f"| {header[i]} | FusionBench CLIP-ViT-B/32 TA8 | {r:.2f} | {n} |")
    print(f"\nresults: {store_path}")


if __name__ == "__main__":
    main()
