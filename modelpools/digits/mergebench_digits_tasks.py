"""The eight digit tasks every digits-based pool shares: the data, the split, the views, and the calibration of
CLIP-style zero-shot heads.

The embedded pool (`mergebench_digits`), the independent pools (`mergebench_digits_seeds`) and the EfficientNet pool
(`mergebench_effnet`) all score on these tasks. They used to take them from `mergebench_digits`, which in turn
imported the independent pools to register them: this module is the part they share, so each of them depends on it
and none depends on another.

Data: scikit-learn's bundled `load_digits` (1,797 real 8×8 handwritten digits), split once into 1,200 train and
597 test images by a seeded permutation. Eight tasks see those digits through different views: the digit itself,
rotated by 90° and 180°, mirrored, shifted, transposed, and two relabelings (parity, and whether the digit is at
least 5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from mergebench_core.data.splits import validation_indices

TASKS = ("digits", "rot90", "rot180", "mirror", "shift", "transpose", "parity", "magnitude")
DATA_SEED = 0
"""The seed of the train/test permutation every registered digits pool uses."""
N_TRAIN = 1200
"""Train images of that split (the other 597 are the test split)."""


class SplitRecipe(Protocol):
    """What decides the split: the permutation's seed and the number of train images (a pool's recipe has both)."""

    @property
    def seed(self) -> int: ...

    @property
    def n_train(self) -> int: ...


@dataclass(frozen=True)
class DataSplit:
    """A split of the digits on its own, for pools whose recipe is not the embedded pool's."""

    seed: int = DATA_SEED
    n_train: int = N_TRAIN


def view(task: str, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A task's inputs and labels from (N, 8, 8) images in [0, 1] and digit labels."""
    if task == "digits":
        return images, labels
    if task == "rot90":
        return torch.rot90(images, 1, (1, 2)), labels
    if task == "rot180":
        return torch.rot90(images, 2, (1, 2)), labels
    if task == "mirror":
        return torch.flip(images, (2,)), labels
    if task == "shift":
        return torch.roll(images, 2, 2), labels
    if task == "transpose":
        return images.transpose(1, 2), labels
    if task == "parity":
        return images, labels % 2
    if task == "magnitude":
        return images, (labels >= 5).long()
    raise KeyError(f"unknown digits task {task!r}; tasks: {', '.join(TASKS)}")


@dataclass
class DigitsData:
    """The fixed train/test split of the bundled digits, and each task's view of it."""

    recipe: SplitRecipe
    images: torch.Tensor = field(init=False)
    labels: torch.Tensor = field(init=False)
    order: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        self.images = torch.tensor(x, dtype=torch.float32).view(-1, 8, 8) / 16.0
        self.labels = torch.tensor(y, dtype=torch.long)
        self.order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.recipe.seed))

    def split(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        idx = self.order[: self.recipe.n_train] if split != "test" else self.order[self.recipe.n_train:]
        if split == "val":  # a fixed 10 % of train, carved as every pool carves it
            idx = idx[validation_indices(len(idx))]
        x, y = view(task, self.images[idx], self.labels[idx])
        return x.reshape(len(idx), 64).contiguous(), y

    def num_classes(self, task: str) -> int:
        return int(self.split(task, "train")[1].max()) + 1


def calibrated_scale(cosines: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> float:
    """The one logit scale s, shared by every task, that minimises the summed cross-entropy of s · cosines[t]
    against labels[t] (each task's mean, summed over tasks).

    A zero-shot head is a set of unit-norm class embeddings; its logits are scaled cosines, and the scale decides
    how confident the pretrained model is. Choosing it to minimise the train loss makes the pretrained model's
    predictions calibrated, neither over- nor under-confident, without training anything. The loss is convex in s;
    a golden-section search over log s in [0, log 1000] (40 steps) finds it."""

    def loss(log_s: float) -> float:
        return sum(float(F.cross_entropy(math.exp(log_s) * c, labels[t])) for t, c in cosines.items())

    lo, hi = 0.0, math.log(1000.0)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2.0)
