"""The fusion table: every independent digits pool (3 architectures × 4 data settings) × every fusion method, test
accuracy as mean ± sample std over pool seeds, with build and fusion times.

For each pool and pool seed (cell seed s fuses the base models of pool seed s, as `mergebench run --seed` does), it
builds the pool if it is not cached (single-threaded), scores each base model, the best of them, their logit
ensemble and their plain average, and runs each method with its default parameters (and the variants named below)
exactly as a `mergebench run` cell would (`RunContext` with the cell's seed, activations cached under --root).
Prints one table per architecture (rows: settings; columns: methods), then the mean fusion seconds per method and
architecture, and the build seconds per pool. Not part of the test suite.

    python bench/fusion_table.py                                  # everything, seeds 0,1,2 (about half an hour)
    python bench/fusion_table.py --archs mlp --seeds 0 --methods hf_fusion,kf_fusion
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "simple_average": ("simple_average", {}),
    "git_rebasin": ("git_rebasin", {}),
    "git_rebasin (act.)": ("git_rebasin", {"matching": "activation"}),
    "otfusion": ("otfusion", {}),
    "otfusion (act.)": ("otfusion", {"cost": "activation"}),
    "hf_fusion": ("hf_fusion", {}),
    "kf_fusion": ("kf_fusion", {}),
    "alf": ("alf", {}),
}
SETTINGS = ("seeds", "split2", "split4", "shard2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="mlp,cnn,vit")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"columns among: {', '.join(METHODS)}")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "mergebench-fusion-table",
                        help="where pools and activations are cached")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args()

    import torch
    from mergebench_digits_seeds import POOLS, DigitsFullTaskPool
    from tabulate import tabulate

    from mergebench_core import Ensemble, RunContext
    from mergebench_core.data.evaluation import evaluate
    from mergebench_core.contract.registry import get_registry

    torch.set_num_threads(1)
    registry = get_registry()
    tasks = DigitsFullTaskPool()
    columns = ["models", "best model", "ensemble", *args.methods.split(",")]
    acc: dict[tuple[str, str, str], list[float]] = {}
    secs: dict[tuple[str, str], list[float]] = {}
    builds: dict[str, list[float]] = {}
    refused: dict[tuple[str, str], str] = {}

    def score(model) -> float:
        return 100 * evaluate(tasks, model)["digits"]["accuracy"]

    for arch in args.archs.split(","):
        for setting in args.settings.split(","):
            name = f"digits-{arch}_{setting}"
            for seed in map(int, args.seeds.split(",")):
                base = POOLS[name]()
                base.root = args.root / "pools"
                pool = base.for_seed(seed)
                pool.folder  # noqa: B018 - builds the pool if it is not cached
                builds.setdefault(name, []).append(pool.build_info().get("seconds", float("nan")))
                models = [pool.load_model(n) for n in pool.expert_names]
                single = [score(m) for m in models]
                acc.setdefault((arch, setting, "models"), []).extend(single)
                acc.setdefault((arch, setting, "best model"), []).append(max(single))
                acc.setdefault((arch, setting, "ensemble"), []).append(score(Ensemble(models)))
                for column in args.methods.split(","):
                    method_name, overrides = METHODS[column]
                    cls = registry.method(method_name)
                    reason = cls.cannot_run_on(pool)
                    if reason:
                        refused[(arch, column)] = reason
                        continue
                    torch.manual_seed(seed)  # as the runner does for each cell
                    ctx = RunContext(taskpool=tasks, seed=seed, tasks=("digits",), cache_dir=args.root / "ctx")
                    start = time.perf_counter()
                    out = cls(cls.Params(**overrides)).run(pool, ctx)
                    secs.setdefault((arch, column), []).append(time.perf_counter() - start)
                    acc.setdefault((arch, setting, column), []).append(score(out.model))
                print(f"{name} seed {seed}: done", file=sys.stderr, flush=True)

    def cell(values: list[float] | None) -> str:
        if not values:
            return "—"
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    for arch in args.archs.split(","):
        rows = [[setting, *(cell(acc.get((arch, setting, c))) for c in columns)]
                for setting in args.settings.split(",")]
        print(f"\n#### {arch}\n")
        print(tabulate(rows, headers=["setting", *columns], tablefmt="github", disable_numparse=True))
    print("\n#### fusion seconds (mean over pools and seeds)\n")
    rows = [[arch, *(f"{statistics.mean(secs[(arch, c)]):.2f}" if (arch, c) in secs else "—"
                     for c in args.methods.split(","))] for arch in args.archs.split(",")]
    print(tabulate(rows, headers=["arch", *args.methods.split(",")], tablefmt="github", disable_numparse=True))
    print("\n#### pool build seconds (single thread, mean over seeds)\n")
    print(tabulate([[n, f"{statistics.mean(v):.1f}"] for n, v in builds.items()], headers=["pool", "build (s)"],
                   tablefmt="github", disable_numparse=True))
    for (arch, column), reason in refused.items():
        print(f"\n{column} on {arch} pools: not run: {reason}")
    if args.json is not None:
        args.json.write_text(json.dumps({"accuracy": {"/".join(k): v for k, v in acc.items()},
                                         "seconds": {"/".join(k): v for k, v in secs.items()},
                                         "builds": builds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
