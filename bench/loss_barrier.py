"""The loss barrier on the linear path between two independently trained models, before and after alignment.

For each pool, models `seed0` (A) and `seed1` (B) and the models (1 − t)·A + t·B' for t in [0, 1], where B' is B
as trained ("none") or B permuted onto A by Git Re-Basin's weight matching ("weight"), activation matching
("activation"), or OTFusion's exact transport with weight costs ("ot"). Prints the barrier (the largest rise of the
test loss above the straight line between the ends, `mergebench_core.fusion.levels.loss_barrier`) and the accuracy at the
midpoint, and draws the loss curves (`--plot`, PNG/SVG/PDF; needs matplotlib). Pools build on first use (cached under
--root). Not part of the test suite.

    python bench/loss_barrier.py                                   # the three full-dataset pools
    python bench/loss_barrier.py --pools digits-mlp_seeds,digits-mlp_split2 --plot barrier.png
    python bench/loss_barrier.py --seed 1                          # the base models of pool seed 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ALIGNMENTS = ("none", "weight", "activation", "ot")


def aligned_b(alignment: str, pool, tasks, cache_dir: Path) -> dict:
    """Model B's state dict, moved onto model A's units by `alignment`."""
    from mergebench_core.fusion.alignment import activation_matching, apply_permutation, unit_activations, weight_matching
    from mergebench_core.data.statistics import StatsCache

    spec = pool.permutation_spec()
    a, b = (pool.state_dict(n) for n in pool.expert_names[:2])
    if alignment == "none":
        return b
    if alignment == "weight":
        return apply_permutation(spec, b, weight_matching(spec, a, b))
    if alignment == "activation":
        cache = StatsCache(cache_dir / "stats")
        za, zb = (unit_activations(spec, pool.load_model(n), tasks, ["digits"], n_examples=512, cache=cache,
                                   model_identity=pool.identity(n)) for n in pool.expert_names[:2])
        return apply_permutation(spec, b, activation_matching(spec, za, zb))
    from mergebench_otfusion import Params, align

    return align(spec, a, b, Params())[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", default="digits-mlp_seeds,digits-cnn_seeds,digits-vit_seeds")
    parser.add_argument("--alignments", default=",".join(ALIGNMENTS))
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0, help="the pool seed (which base models)")
    parser.add_argument("--plot", type=Path, default=None, help="write the loss curves here (png, svg or pdf)")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "mergebench-loss-barrier",
                        help="where pools and activations are cached")
    args = parser.parse_args()

    import torch
    from mergebench_digits_seeds import POOLS, DigitsFullTaskPool
    from tabulate import tabulate

    from mergebench_core.fusion.levels import interpolation_curve, loss_barrier

    torch.set_num_threads(1)
    tasks = DigitsFullTaskPool()
    rows, curves = [], {}
    for name in args.pools.split(","):
        pool = POOLS[name]()
        pool.root = args.root / "pools"
        pool = pool.for_seed(args.seed)
        start = time.perf_counter()
        pool.folder  # noqa: B018 - builds the pool if it is not cached
        a = pool.state_dict(pool.expert_names[0])
        for alignment in args.alignments.split(","):
            t0 = time.perf_counter()
            b = aligned_b(alignment, pool, tasks, args.root)
            seconds = time.perf_counter() - t0
            curve = interpolation_curve(pool.load_model(pool.expert_names[0]), a, b, tasks, points=args.points)
            curves[(name, alignment)] = curve
            mid = curve[len(curve) // 2]
            rows.append([name, alignment, f"{loss_barrier(curve):.3f}", f"{100 * loss_barrier(curve, 'accuracy'):.1f}",
                         f"{100 * mid['accuracy']:.1f}", f"{100 * curve[0]['accuracy']:.1f}",
                         f"{100 * curve[-1]['accuracy']:.1f}", f"{seconds:.2f}"])
        print(f"{name}: ready in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(tabulate(rows, headers=["pool", "alignment", "loss barrier", "accuracy drop (pts)", "midpoint acc.",
                                  "acc. A", "acc. B", "align (s)"], tablefmt="github", disable_numparse=True))
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = args.pools.split(",")
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
        for ax, name in zip(axes[0], names):
            for alignment in args.alignments.split(","):
                curve = curves[(name, alignment)]
                ax.plot([p["t"] for p in curve], [p["loss"] for p in curve], marker="o", ms=3, label=alignment)
            ax.set_title(name)
            ax.set_xlabel("t  ((1 − t)·A + t·B)")
            ax.set_ylabel("test loss")
            ax.legend(title="alignment", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
