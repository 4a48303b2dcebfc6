"""Do our offline pools rank merging methods the way FusionBench's published tables do?

Runs (or reads from a results store) every method that a published FusionBench table reports, with default
parameters and seed 0, on one or more of our pools, and prints our averages beside each published table with the
Spearman rank correlation over the rows they share. Several pools (say one pool at three expert seeds) give a mean
and a standard deviation per method, and one correlation per pool, so the spread of the correlation is visible too.

The published tables (average accuracy over the tasks, %), copied from FusionBench's documentation:
- `clip-vit-b32_TA8`: CLIP-ViT-B/32 on the eight task-arithmetic tasks (see shared/DESIGN.md, "Published CLIP-ViT-B/32
  TA8 accuracies"); multi-task training is compared with `linear_scalarization` at the uniform preference. The
  upscaled rows (WEMoE, E-WEMoE, SMILE at its defaults) hold several times the base's parameters; the test-time ones
  train for minutes, so a fresh grid takes that much longer.
- `gpt2_glue7`: GPT-2 sequence classifiers on seven GLUE tasks (docs/modelpool/gpt2_classification.md, "Multi-task
  model merging methods using GPT-2 models"); the pretrained row is that page's task-arithmetic sweep at λ = 0.
  Task arithmetic is published at λ = 0.5 and TIES at λ = 0.6, ours at their defaults (0.3).
- `flan-t5-base_glue8` and `flan-t5-base-lora16_glue8`: Flan-T5-base, fully fine-tuned and LoRA r = 16, on eight GLUE
  tasks as text generation (docs/modelpool/flan-t5_generation.md); task arithmetic and TIES at λ = 0.3.
The GPT-2 and Flan-T5 tables have five and three merging rows: their correlations rest on very few pairs, and the
script prints how many. This is a report, not a target: no method is tuned toward it.

    python bench/ranking_vs_fusionbench.py                       # digits-mlp_TA8, a fresh grid in a temporary store
    python bench/ranking_vs_fusionbench.py --store results.sqlite \\
        --pool 'minilm_text8,minilm_text8(seed=1),minilm_text8(seed=2)'   # read a grid already run
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from mergebench_core.contract.registry import get_registry
from mergebench_core.data.metrics import spearman
from mergebench_core.results.store import ResultStore
from mergebench_core.running.runner import Runner, RunOptions

PUBLISHED_TABLES: dict[str, dict[str, float]] = {
    "clip-vit-b32_TA8": {
        "pretrained": 48.2, "individual": 90.3, "linear_scalarization": 88.6, "ensemble": 75.8, "simple_average": 66.5,
        "fisher": 70.6, "regmean": 82.4, "regmean_pp": 84.4, "task_arithmetic": 68.0, "ties": 72.2,
        "adamerging_tw": 68.7, "adamerging_lw": 82.6, "wudi": 84.5, "iso_c": 82.8, "iso_cts": 82.7,
        # upscaled models (WEMoE 6.3x the parameters): FusionBench docs (modelpool/clip_vit) and its SMILE notebook
        "wemoe": 89.2, "sparse_wemoe": 89.1, "smile": 86.2,
        # test-time and low-rank methods, each at our plugin's default: AdaMerging + Representation Surgery
        # (`surgery`, base adamerging_lw; FusionBench), AdaRank on Iso-CTS (`adarank`, base iso_cts; its ICLR 2026
        # paper), CART (its authors' README)
        "surgery": 86.1, "adarank": 89.4, "cart": 84.7,
    },
    "gpt2_glue7": {
        "pretrained": 44.5, "individual": 82.0, "simple_average": 56.1, "fisher": 58.7, "regmean": 68.8,
        "task_arithmetic": 70.0, "ties": 70.0,
    },
    "flan-t5-base_glue8": {
        "pretrained": 75.7, "individual": 86.4, "simple_average": 78.9, "task_arithmetic": 78.9, "ties": 79.9,
    },
    "flan-t5-base-lora16_glue8": {
        "pretrained": 75.7, "individual": 84.6, "simple_average": 78.2, "task_arithmetic": 77.4, "ties": 77.5,
    },
}
PUBLISHED = PUBLISHED_TABLES["clip-vit-b32_TA8"]
"""The CLIP table alone, under the name `bench/sensitivity.py` imports."""
REFERENCES = ("pretrained", "individual")
DEFAULT_POOL = "digits-mlp_TA8"


def split_pools(text: str) -> list[str]:
    """'a,b(x=1,y=2)' -> ['a', 'b(x=1,y=2)']: commas inside parentheses belong to a pool's parameters."""
    pools, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            pools.append(text[start:i].strip())
            start = i + 1
    pools.append(text[start:].strip())
    return [p for p in pools if p]


def wanted_methods() -> list[str]:
    names = {m for table in PUBLISHED_TABLES.values() for m in table}
    return sorted(names - set(REFERENCES))


def ours(store_path: Path | None, pool: str) -> dict[str, float]:
    """Average accuracy (%) per method on `pool` at default parameters and seed 0 (uniform preference for training
    methods), and the pretrained and individual reference rows."""
    if store_path is None:
        store_path = Path(tempfile.mkdtemp(prefix="mb-ranking-")) / "results.sqlite"
    store = ResultStore(store_path)
    if not store.all(pool):
        registry = get_registry()
        methods = [m for m in wanted_methods() if m in registry.methods]
        runner = Runner(registry, None, RunOptions(methods=methods, modelpools=[pool]))
        cells = runner.plan()
        runner.store = store
        runner.run(cells)
    found: dict[str, float] = {}
    registry = get_registry()
    for r in store.all(pool):
        if r.status != "ok" or r.mean is None or r.seed != 0:
            continue
        if r.kind == "method":
            defaults = registry.methods[r.method].obj.Params().__dict__ if r.method in registry.methods else None
            if r.params != defaults or r.preference not in (None, [1 / len(r.metrics)] * len(r.metrics)):
                continue
        found[r.method] = 100 * r.mean
    return found


def correlation(mine: dict[str, float], published: dict[str, float], merges_only: bool) -> tuple[float, int]:
    rows = [m for m in published if m in mine and not (merges_only and m in REFERENCES)]
    if len(rows) < 3:
        return float("nan"), len(rows)
    return spearman(torch.tensor([mine[m] for m in rows]), torch.tensor([published[m] for m in rows])), len(rows)


def report(per_pool: dict[str, dict[str, float]]) -> list[str]:
    """The markdown that `main` prints: one table of every method, then the correlations per published table."""
    pools = list(per_pool)
    methods = sorted({m for table in PUBLISHED_TABLES.values() for m in table},
                     key=lambda m: (-PUBLISHED.get(m, -1.0), -PUBLISHED_TABLES["gpt2_glue7"].get(m, -1.0), m))
    label = pools[0] if len(pools) == 1 else f"ours, mean ± std over {len(pools)} pools"
    lines = ["| method | " + " | ".join(PUBLISHED_TABLES) + f" | {label} |",
             "|---|" + "---|" * (len(PUBLISHED_TABLES) + 1)]
    mean: dict[str, float] = {}
    for m in methods:
        values = [per_pool[p][m] for p in pools if m in per_pool[p]]
        if values:
            mean[m] = statistics.fmean(values)
        ours_cell = "—" if not values else (f"{mean[m]:.1f}" if len(values) == 1 else
                                            f"{mean[m]:.1f} ± {statistics.stdev(values):.1f}")
        published = " | ".join(f"{t[m]:.1f}" if m in t else "" for t in PUBLISHED_TABLES.values())
        lines.append(f"| {m} | {published} | {ours_cell} |")
    lines += ["", "| published table | rows (merges) | Spearman, all rows | Spearman, merges only |"
              + ("" if len(pools) == 1 else " per pool, merges only |"), "|---|---|---|---|"
              + ("" if len(pools) == 1 else "---|")]
    for name, table in PUBLISHED_TABLES.items():
        rho_all, n_all = correlation(mean, table, merges_only=False)
        rho_merge, n_merge = correlation(mean, table, merges_only=True)
        line = f"| {name} | {n_all} ({n_merge}) | {rho_all:.2f} | {rho_merge:.2f} |"
        if len(pools) > 1:
            line += " " + ", ".join(f"{correlation(per_pool[p], table, True)[0]:.2f}" for p in pools) + " |"
        lines.append(line)
    missing = [m for m in methods if m not in mean]
    if missing:
        lines += ["", f"not in the store (not installed, not run, or refused): {', '.join(missing)}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="read (and extend) this results store instead of a temporary one")
    parser.add_argument("--pool", default=DEFAULT_POOL,
                        help="our pool, or several separated by commas (say, one pool at three expert seeds)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    per_pool = {pool: ours(args.store, pool) for pool in split_pools(args.pool)}
    print("\n".join(report(per_pool)))


if __name__ == "__main__":
    main()
