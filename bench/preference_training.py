"""Benchmark: the cost of one training step of the preference-aware training methods as the number of tasks grows.

On the embedded digits pool, `linear_scalarization` (one backward of Σ r_t L_t), `chebyshev` (one backward of
max_t r_t L_t) and `epo` (one backward per task for the gradient matrix G, the Gram matrix G Gᵀ, a linear program
over the simplex, then the loop's backward of Σ β_t L_t) each train for a few steps from the pretrained model, through
the core's loop, on the first 2, 4 and 8 tasks with a uniform preference. The table gives the best of 3 runs in
milliseconds per step, and each method's ratio to linear scalarization.

The last line times the trained-model cache: the first `obtain` of a recipe trains and caches, the second loads.

Run: `python bench/preference_training.py` (options: `--steps`, `--repeats`, `--tasks 2,4,8`, `--device cuda`).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from mergebench_core import PRETRAINED
from mergebench_core.training.loop import train

METHODS = ("linear_scalarization", "chebyshev", "epo")


def method_of(name: str, steps: int):
    if name == "linear_scalarization":
        from mergebench_linear_scalarization import LinearScalarization, Params
        return LinearScalarization(Params(steps=steps))
    if name == "chebyshev":
        from mergebench_chebyshev import Chebyshev, Params
        return Chebyshev(Params(steps=steps))
    from mergebench_epo import EPO, Params
    return EPO(Params(steps=steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the best is reported (default 3)")
    parser.add_argument("--tasks", default="2,4,8", help="task counts (default 2,4,8)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from mergebench_digits import DigitsModelPool, DigitsTaskPool

    pool, taskpool = DigitsModelPool(), DigitsTaskPool()
    _ = pool.folder  # build (or find) the pool before any timing
    device = torch.device(args.device)
    counts = [int(c) for c in args.tasks.split(",")]
    n_params = sum(p.numel() for p in pool.load_model(PRETRAINED).parameters() if p.requires_grad)
    print(f"digits-mlp_TA8, {n_params:,} trainable parameters, batch 64 per task, {args.steps} steps per run, "
          f"best of {args.repeats}, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows: dict[tuple[str, int], float] = {}
    notes: dict[int, str] = {}
    for m in counts:
        tasks = taskpool.tasks[:m]
        for name in METHODS:
            best = float("inf")
            for repeat in range(args.repeats):
                method = method_of(name, args.steps)
                model = pool.load_model(PRETRAINED)
                extras = {"preference": {t: 1.0 / m for t in tasks}}
                seen: dict = {}

                def loss(model, batches, state, method=method, seen=seen):
                    seen["state"] = state
                    return method.loss(model, batches, state)

                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                train(model, taskpool, tasks, loss, method.train_config(), seed=repeat, device=device,
                      extras=extras)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, (time.perf_counter() - start) / args.steps)
                if name == "epo":
                    stats = seen["state"].report["epo"]
                    notes[m] = (f"epo on {m} tasks: {stats['balance_steps']} balance / {stats['descent_steps']} "
                                f"descent steps, {stats['fallbacks']} fallbacks in the last run")
            rows[(name, m)] = best
    header = "| method               | " + " | ".join(f"{m} tasks (ms/step, ×LS)" for m in counts) + " |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name in METHODS:
        cells = [f"{1000 * rows[(name, m)]:8.2f}  ×{rows[(name, m)] / rows[('linear_scalarization', m)]:4.2f}"
                 for m in counts]
        print(f"| {name:<20} | " + " | ".join(f"{c:<22}" for c in cells) + " |")
    for m in counts:
        print(notes[m])
    cache_hit(pool, taskpool, counts[-1], args.steps, device)


def cache_hit(pool, taskpool, m: int, steps: int, device: torch.device) -> None:
    """What re-scoring a front costs per preference: training once against finding the trained model again."""
    import tempfile
    from pathlib import Path

    from mergebench_core.training.methods import TrainedModelCache

    tasks = taskpool.tasks[:m]
    with tempfile.TemporaryDirectory() as tmp:
        cache = TrainedModelCache(Path(tmp))
        timings = []
        for _ in range(2):
            method = method_of("linear_scalarization", steps)
            start = time.perf_counter()
            _, info = method.obtain(pool, taskpool, tasks, seed=0, preference=[1.0 / m] * m, cache=cache,
                                    code_version="bench", device=device)
            timings.append((time.perf_counter() - start, info["trained_now"]))
    (first, trained), (second, again) = timings
    print(f"linear_scalarization on {m} tasks, {steps} steps: trained and cached in {first:.2f} s (trained: "
          f"{trained}); the same recipe again: {1000 * second:.0f} ms (trained: {again}), {first / second:.0f}x less")


if __name__ == "__main__":
    main()
