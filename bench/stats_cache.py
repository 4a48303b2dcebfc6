"""Benchmark: what the shared statistics cache saves a second method that needs the same statistics.

On the embedded digits pool, with an empty statistics cache:
1. Fisher merging computes the experts' diagonal Fishers (sampled labels, 256 examples each);
2. uncertainty-based gradient matching then needs the same expert Fishers (plus the pretrained model's, which it
   alone uses and which are reported apart);
3. RegMean computes the experts' linear-input Grams, and RegMean with another α needs the same Grams.
Every lookup of the cache is timed, so the report compares the time each method spent obtaining the statistics it
shares with the first one. Run: `python bench/stats_cache.py` (add `--keep DIR` to keep the cache folder).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from mergebench_core import RunContext
from mergebench_core.data.statistics import StatsCache

log = logging.getLogger("bench.stats_cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="folder for the statistics cache (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from mergebench_digits import DigitsModelPool, DigitsTaskPool
    from mergebench_fisher import FisherMerging
    from mergebench_gradient_matching import GradientMatching
    from mergebench_regmean import Params as RegMeanParams
    from mergebench_regmean import RegMean

    pool, taskpool = DigitsModelPool(), DigitsTaskPool()
    _ = pool.folder  # build (or find) the pool before any timing
    timings: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    current = {"method": ""}
    original = StatsCache.get_or_compute

    def timed(self: StatsCache, key, compute):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return original(self, key, compute)
        finally:
            group = "pretrained" if key.model.endswith("/_pretrained_") else key.statistic
            timings[current["method"]][group] += time.perf_counter() - start

    StatsCache.get_or_compute = timed  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(taskpool=taskpool, cache_dir=Path(args.keep or tmp))
        runs = [("fisher", FisherMerging()), ("gradient_matching", GradientMatching()),
                ("regmean", RegMean()), ("regmean α=0.5", RegMean(RegMeanParams(reduce_non_diagonal_ratio=0.5)))]
        for label, method in runs:
            current["method"] = label
            start = time.perf_counter()
            method.run(pool, ctx)
            log.info("%-18s whole run %.2f s; statistics: %s", label, time.perf_counter() - start,
                     ", ".join(f"{k} {v:.3f} s" for k, v in timings[label].items()))
    StatsCache.get_or_compute = original  # type: ignore[method-assign]

    pairs = [("expert Fishers", "fisher", "gradient_matching", "fisher_sampled"),
             ("expert Grams", "regmean", "regmean α=0.5", "linear_grams")]
    for what, first, second, stat in pairs:
        a, b = timings[first][stat], timings[second][stat]
        log.info("%s: first method %.3f s, second method %.3f s = %.1f%% of the first", what, a, b, 100 * b / a)


if __name__ == "__main__":
    main()
