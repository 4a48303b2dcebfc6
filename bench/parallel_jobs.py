"""Benchmark: the embedded pool's grid with 1 and 2 jobs, and what isolating each cell in a worker costs.

Runs `mergebench run` on `digits-mlp_TA8` (its pool already built, so only cells are timed) for the data-free
methods (`--methods` to change) into a fresh results store each time, under three settings: `--isolation none` (every
cell in the driver's process), `--jobs 1` (each cell in a fresh forked worker, the default) and `--jobs 2`. Each is
run `--repeat` times, alternating, and the median wall time is printed with the ratios, then the check that `--jobs 2`
stored exactly the numbers `--jobs 1` did.

Run: `python bench/parallel_jobs.py` (a few minutes on 2 cores). Workers compute single-threaded (unless
MERGEBENCH_WORKER_THREADS says otherwise), so every setting but `--isolation none` computes the same bits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA_FREE = ("simple_average,weighted_average,task_arithmetic,ties,dare_ta,dare_ties,breadcrumbs,magmax,model_stock,"
             "tsv_m,iso_c,iso_cts,consensus,tall_masks,emr,ensemble,weighted_ensemble,wudi")
SETTINGS = {"in-process": ["--isolation", "none"], "jobs 1": ["--jobs", "1"], "jobs 2": ["--jobs", "2"]}


def run(methods: str, extra: list[str], store: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mergebench_core.cli", "-q", "run", "-m", methods, "-p", "digits-mlp_TA8",
                    "--store", str(store), *extra], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DATA_FREE)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from mergebench_core.results.store import ResultStore
    from mergebench_digits import DigitsModelPool

    _ = DigitsModelPool().folder  # build the pool once, outside the timings
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for name, extra in SETTINGS.items():
                times[name].append(run(args.methods, extra, Path(tmp) / f"{name}-{i}.sqlite"))
        one = {r.cell_key: r.metrics for r in ResultStore(Path(tmp) / "jobs 1-0.sqlite").all()}
        two = {r.cell_key: r.metrics for r in ResultStore(Path(tmp) / "jobs 2-0.sqlite").all()}
    median = {k: statistics.median(v) for k, v in times.items()}
    cells = len(args.methods.split(","))
    print(f"{cells} methods on digits-mlp_TA8, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, median of {args.repeat}")
    for name, value in median.items():
        print(f"  {name:<11} {value:6.1f} s   (runs: {', '.join(f'{t:.1f}' for t in times[name])})")
    print(f"  fresh worker per cell / in-process: {median['jobs 1'] / median['in-process']:.2f}x")
    print(f"  jobs 1 / jobs 2 (speed-up):        {median['jobs 1'] / median['jobs 2']:.2f}x")
    print(f"  jobs 2 stored the same numbers as jobs 1: {one == two} ({len(one)} rows)")


if __name__ == "__main__":
    main()
