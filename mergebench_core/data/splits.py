"""The validation split every task pool offers: a deterministic slice of its train split.

FusionBench carves 10 % of each task's train split with seed 0 for methods that tune on held-out data; mergebench
does the same, in one place, so every pool's "val" holds the same examples on every machine. "train" stays whole:
statistics already computed on it (Fisher, Gram matrices) and the pools' own recipes do not change.
"""

from __future__ import annotations

import math

import torch

VAL_FRACTION = 0.1
VAL_SEED = 0


def validation_indices(num_train: int, fraction: float = VAL_FRACTION, seed: int = VAL_SEED) -> torch.Tensor:
    """Sorted indices into the train split that form "val": max(1, ⌊fraction · n + ½⌋) of them (halves round up),
    chosen by a seeded permutation (the same for every caller with the same n)."""
    if num_train < 1:
        raise ValueError(f"a train split of {num_train} examples has no validation split")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    count = max(1, math.floor(fraction * num_train + 0.5))
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return order[:count].sort().values
