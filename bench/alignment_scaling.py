"""Cost of each alignment as the width grows: what fits on your machine.

For widths w (default 64 to 1024), on one CPU thread, times one alignment of two random models or neuron sets:
- `weight matching`: Git Re-Basin's coordinate ascent on two MLPs 64 → w → w → 10 (two w × w Hungarian problems
  per sweep, sweeps until nothing improves; scipy's `linear_sum_assignment`, O(w³) each);
- `activation matching`: one layer, correlations of n samples (O(n·w²)) and one Hungarian problem (O(w³));
- `OT emd` / `OT sinkhorn`: one layer, Euclidean costs between w and w units (O(n·w²)), then POT's exact network
  simplex (about O(w³), often better) or Sinkhorn (O(w²) per iteration);
- `HF targets`: one layer's pair costs (O(n·w²) from Gram matrices) and one Hungarian problem;
- `KF targets`: weighted K-means of 2w neurons into w clusters (O(iterations · n · w²) plus restarts);
- `least squares`: one level's fit, n × (w + 1) inputs to w outputs (O(n·w²)).
Activation-based rows use n = 2w samples (least squares needs at least w + 1). Not part of the test suite.

    python bench/alignment_scaling.py
    python bench/alignment_scaling.py --widths 128,512,2048 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="64,128,256,512,1024")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import torch
    from mergebench_otfusion import transport_plan
    from tabulate import tabulate
    from torch import nn

    from mergebench_core.fusion.alignment import PermutationSpec, activation_matching, mlp_permutation_spec, weight_matching
    from mergebench_core.fusion.levels import fit_linear_level, hungarian_targets, kmeans_targets

    torch.set_num_threads(1)
    spec = mlp_permutation_spec(["fc1", "fc2", "fc3"])

    def mlp(width: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        shapes = {"fc1": (width, 64), "fc2": (width, width), "fc3": (10, width)}
        out = {}
        for layer, (o, i) in shapes.items():
            out[f"{layer}.weight"] = torch.randn(o, i, generator=g) / i**0.5
            out[f"{layer}.bias"] = torch.zeros(o)
        return out

    rows = []
    for width in [16, *map(int, args.widths.split(","))]:  # the first, tiny one only warms up (imports, caches)
        n = 2 * width
        g = torch.Generator().manual_seed(width)
        a, b = mlp(width, 0), mlp(width, 1)
        za, zb = torch.randn(n, width, generator=g), torch.randn(n, width, generator=g)
        one = PermutationSpec({"x.weight": ("P", None)}, points={"P": "x"})
        ones = torch.ones(width)
        uniform = torch.full((width,), 1.0 / width, dtype=torch.float64)
        x = torch.randn(n, width, generator=g)
        level = nn.Linear(width, width)
        timings = {
            "weight matching": best_of(args.repeats, lambda: weight_matching(spec, a, b)),
            "activation matching": best_of(args.repeats, lambda: activation_matching(one, {"P": za}, {"P": zb})),
            "OT emd": best_of(args.repeats, lambda: transport_plan(torch.cdist(zb.T, za.T), uniform, uniform)),
            "OT sinkhorn": best_of(args.repeats, lambda: transport_plan(torch.cdist(zb.T, za.T), uniform, uniform,
                                                                        "sinkhorn", 0.01)),
            "HF targets": best_of(args.repeats, lambda: hungarian_targets([za, zb], [ones, ones])),
            "KF targets": best_of(args.repeats, lambda: kmeans_targets([za, zb], [ones, ones], width, restarts=3)),
            "least squares": best_of(args.repeats, lambda: fit_linear_level(level, x, za)),
        }
        if width != 16 or "16" in args.widths.split(","):
            rows.append([width, n, *(f"{t:.3f}" for t in timings.values())])
        print(f"width {width} done", file=sys.stderr)
    print(tabulate(rows, headers=["width", "samples", *timings], tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
