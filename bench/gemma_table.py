"""The MergeBench-style table of `gemma3-270m_lora4`: every data-free merging method that applies to LoRA experts
of a causal LM, per-task scores with their standard errors, the pretrained and expert reference rows, merge seconds.

It runs the grid through `mergebench run` (cells already in the store are not run again), then reads the store and
prints one markdown table: a row per method (and the references), a column per task with lm-eval's primary metric ±
its standard error (exact match for the three generation tasks, accuracy for the code choice), the mean over tasks,
the normalized mean (merged score / the expert's score on the same task, averaged) and merge seconds. Methods that
need task data (Fisher, RegMean, AdaMerging) are not in it: lm-eval tasks hand out no batches.

    python bench/gemma_table.py --limit 50                 # what the README's table was made with (on 2 CPU cores)
    python bench/gemma_table.py --methods task_arithmetic,ties --limit 20 --store /tmp/g.sqlite
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

METHODS = ("simple_average", "task_arithmetic", "lora_task_arithmetic", "ties", "dare_ta", "dare_ties",
           "breadcrumbs", "magmax", "tsv_m", "iso_c", "knots", "breadcrumbs_ties", "della", "sce", "pcb", "ram",
           "model_stock", "consensus", "emr", "iso_cts", "wudi", "cart", "svc", "ta_trust_region_zs", "doge_ta",
           "localize_stitch_dataless", "karcher", "opcm", "dop")
"""Every data-free method that runs on this pool (checked on the tiny test pool), at its defaults. Not here:
`multislerp` (tensors no LoRA expert changes have zero task vectors, whose mean direction it refuses),
`arcee_fusion` and `slerp`/`nuslerp` (one or two experts), and methods that read task data."""
POOL = "gemma3-270m_lora4"


def primary(task: str, metrics: dict[str, float]) -> tuple[str, str]:
    """The primary metric of a task row and its standard error's key (lm-eval's names, filter after a comma)."""
    name = "acc" if "acc" in metrics else next(k for k in metrics if k.startswith("exact_match") and
                                                "stderr" not in k)
    base, _, filt = name.partition(",")
    return name, f"{base}_stderr" + (f",{filt}" if filt else "")


def cell(metrics: dict[str, float], task: str) -> str:
    if not metrics:
        return "—"
    value, err = primary(task, metrics)
    se = metrics.get(err, math.nan)
    return f"{100 * metrics[value]:.1f} ± {100 * se:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--limit", type=int, default=50, help="documents scored per task (lm-eval's --limit)")
    parser.add_argument("--store", type=Path, default=Path("gemma_table.sqlite"))
    parser.add_argument("--pool", default=POOL, help="the pool, with parameters if any: gemma3-270m_lora4(steps=100)")
    parser.add_argument("--no-run", action="store_true", help="only print the table of what the store holds")
    args = parser.parse_args()

    if not args.no_run:
        cmd = [sys.executable, "-m", "mergebench_core.cli", "run", "-m", args.methods, "-p", args.pool,
               "--limit", str(args.limit), "--store", str(args.store), "--device", "cpu", "--isolation", "none"]
        print("$", " ".join(cmd[1:]), file=sys.stderr)
        subprocess.run(cmd, check=False)

    from mergebench_core.results.store import ResultStore

    rows = [r for r in ResultStore(args.store).all(modelpool=args.pool) if r.eval_limit == args.limit]
    if not rows:
        print(f"no rows for {args.pool} with --limit {args.limit} in {args.store}", file=sys.stderr)
        return 1
    tasks = sorted({t for r in rows for t in r.metrics})
    wanted = args.methods.split(",")
    order = {"pretrained": -2, "individual": -1, **{m: i for i, m in enumerate(wanted)}}
    rows.sort(key=lambda r: (order.get(r.method, len(order)), r.method))
    header = ["row", *tasks, "avg", "norm", "merge s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        label = {"pretrained": "pretrained", "individual": "experts (each on its task)"}.get(r.method, r.method)
        if r.status != "ok":
            print(f"| {label} | failed: {(r.error or '')[:80]} |")
            continue
        mean = f"{100 * r.mean:.1f}" if r.mean is not None else "—"
        norm = f"{100 * r.normalized_mean:.1f}" if r.normalized_mean is not None else "—"
        merge = f"{r.merge_seconds:.1f}" if r.merge_seconds is not None and r.kind == "method" else ""
        print("| " + " | ".join([label, *(cell(r.metrics.get(t, {}), t) for t in tasks), mean, norm, merge]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
