"""How well does the embedded pool rank methods the way CLIP-ViT-B/32 on eight tasks does?

Runs (or reads from a results store) every method that FusionBench's documentation reports for CLIP-ViT-B/32 TA8,
with default parameters, on `digits-mlp_TA8`, and prints both averages side by side with the Spearman rank
correlation between them. The published numbers are copied from FusionBench's docs (see shared/DESIGN.md,
"Published CLIP-ViT-B/32 TA8 accuracies"); multi-task training is compared with `linear_scalarization` at the uniform
preference. This is a report, not a target: no method is tuned toward it.

Run: `python bench/ranking_vs_fusionbench.py` (a fresh grid in a temporary store, about a minute once the pool is
built), or `--store mergebench-results.sqlite` to read a grid already run with defaults.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from mergebench_core.data.metrics import spearman
from mergebench_core.contract.registry import get_registry
from mergebench_core.running.runner import Runner, RunOptions
from mergebench_core.results.store import ResultStore

POOL = "digits-mlp_TA8"
PUBLISHED = {  # FusionBench docs, CLIP-ViT-B/32, average accuracy over the eight TA8 tasks
    "pretrained": 48.2, "individual": 90.3, "linear_scalarization": 88.6, "ensemble": 75.8, "simple_average": 66.5,
    "fisher": 70.6, "regmean": 82.4, "regmean_pp": 84.4, "task_arithmetic": 68.0, "ties": 72.2,
    "adamerging_tw": 68.7, "adamerging_lw": 82.6, "wudi": 84.5, "iso_c": 82.8, "iso_cts": 82.7,
    "wemoe": 89.2,  # an upscaled model (6.3 × the parameters): named, so it runs although sweeps leave it out
}
REFERENCES = ("pretrained", "individual")


def ours(store_path: Path | None) -> dict[str, float]:
    """Average accuracy (%) per method at default parameters and seed 0, uniform preference for training methods."""
    if store_path is None:
        tmp = Path(tempfile.mkdtemp(prefix="mb-ranking-"))
        store_path = tmp / "results.sqlite"
        methods = [m for m in PUBLISHED if m not in REFERENCES]
        runner = Runner(get_registry(), None, RunOptions(methods=methods, modelpools=[POOL]))
        cells = runner.plan()
        runner.store = ResultStore(store_path)
        runner.run(cells)
    found: dict[str, float] = {}
    registry = get_registry()
    for r in ResultStore(store_path).all(POOL):
        if r.status != "ok" or r.mean is None or r.seed != 0 or r.method not in PUBLISHED:
            continue
        if r.kind == "method":
            defaults = registry.methods[r.method].obj.Params().__dict__ if r.method in registry.methods else None
            if r.params != defaults or r.preference not in (None, [1 / len(r.metrics)] * len(r.metrics)):
                continue
        found[r.method] = 100 * r.mean
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="read this results store instead of running the grid")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    mine = ours(args.store)
    common = [m for m in PUBLISHED if m in mine]
    missing = [m for m in PUBLISHED if m not in mine]
    rho = spearman(torch.tensor([mine[m] for m in common]), torch.tensor([PUBLISHED[m] for m in common]))
    rho_merge = spearman(torch.tensor([mine[m] for m in common if m not in REFERENCES]),
                         torch.tensor([PUBLISHED[m] for m in common if m not in REFERENCES]))
    print(f"| method | FusionBench CLIP-ViT-B/32 TA8 | {POOL} |")
    print("|---|---|---|")
    for m in sorted(common, key=lambda m: -PUBLISHED[m]):
        print(f"| {m} | {PUBLISHED[m]:.1f} | {mine[m]:.1f} |")
    print(f"\nSpearman rank correlation over {len(common)} rows (references included): {rho:.2f}")
    print(f"over the {len(common) - len([m for m in common if m in REFERENCES])} methods alone: {rho_merge:.2f}")
    if missing:
        print(f"not in the store (not installed or not run): {', '.join(missing)}")


if __name__ == "__main__":
    main()
