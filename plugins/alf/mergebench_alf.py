"""ALF, gradient-based level-by-level fusion ("KF gradient fusion" of the neuron-interpolation paper, "Model Fusion
via Neuron Interpolation"; reference code AndrewSpano/neuron-interpolation-model-fusion, `fusion_algorithms/alf.py`).

Like HF/KF linear fusion, the fused model is built one level at a time (`PermutationSpec.levels`: layers, or whole
transformer blocks): the fused model so far gives the level's input on the fusion samples, the base models' outputs
of that level give target neurons (K-means over every model's neurons, or Hungarian pairs with the first model's),
and the fused level is trained to reproduce the targets from its own input, by gradient descent on an importance-
weighted squared error, so any level (a transformer block, a patch embedding) can be fused. The output level's
targets are the models' mean logits, or with `kd_on_head` their mean softmax at temperature `kd_temperature`, fitted
by KL divergence (knowledge distillation on the head).

Conventions and defaults (the reference code's CLI defaults unless noted):
- the fused model starts as a copy of the first model; K-means clusters start from the first model's neurons and
  are ordered like them, so every level starts near its targets, and residual streams keep the first model's order
  (`align_residual` additionally matches a residual level's targets to its input features, the reference's
  `align_skip_connections`; off by default, as there);
- `num_fusion_samples` = 512 train inputs, of which `val_fraction` = 0.2 (drawn from the cell's seed) are held out;
  Adam, `lr` = 1e-3, `weight_decay` = 1e-4, `batch_size` = 32, up to `epochs` = 100 per level with early stopping
  after `patience` = 15 epochs without a better held-out loss; per-level lists (`optimizer_per_level`,
  `lr_per_level`, `epochs_per_level`) override the single values, as the reference's `--*_per_level` flags do;
- unlike the reference, each level keeps its weights with the best held-out loss, its starting weights included,
  so a level is never left worse on held-out samples than where it started (fusing a model with a permuted copy of
  itself therefore returns the same function);
- `importance` = "uniform" ("activation": mean absolute activation), `kmeans_restarts` = 1 (as the reference's
  `num_kmeans_runs`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core import MergebenchError, MethodInfo, RunContext, hookimpl
from mergebench_core.fusion.level_fusion import LevelFusion, LevelFusionParams, LevelStep
from mergebench_core.fusion.levels import Targets, features_last, hungarian_targets, kmeans_targets, match_to_inputs

OPTIMIZERS = ("adam", "sgd")
TARGETS = ("kmeans", "hungarian")


@dataclass
class Params(LevelFusionParams):
    targets: str = "kmeans"
    """Target neurons: "kmeans" (clusters over all models' neurons) or "hungarian" (pairs with the first model's)."""
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 100
    batch_size: int = 32
    patience: int = 15
    """Stop a level after this many epochs without a better held-out loss."""
    val_fraction: float = 0.2
    optimizer_per_level: list[str] | None = None
    lr_per_level: list[float] | None = None
    epochs_per_level: list[int] | None = None
    """One value per level (or one value for all), overriding `optimizer`, `lr` and `epochs`."""
    kd_on_head: bool = False
    """Fit the output level to the models' mean softmax by KL divergence instead of their mean logits by MSE."""
    kd_temperature: float = 2.0
    align_residual: bool = False
    """Match a residual level's targets to its input features (the reference's align_skip_connections)."""
    kmeans_restarts: int = 1
    choices = {"targets": TARGETS, "optimizer": OPTIMIZERS}
    at_least = {"num_fusion_samples": 2, "weight_decay": 0, "epochs": 0, "batch_size": 1, "patience": 1,
                "kmeans_restarts": 1}
    above = {"lr": 0.0, "kd_temperature": 0.0}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("optimizer_per_level", "lr_per_level", "epochs_per_level"):
            values = getattr(self, name)
            if values is not None:
                values = list(values)
                if not values:
                    raise ValueError(f"{name} is empty; give one value per level, or leave it unset")
                if name == "optimizer_per_level" and any(v not in OPTIMIZERS for v in values):
                    raise ValueError(f"{name} must hold {', '.join(OPTIMIZERS)}, got {values}")
                setattr(self, name, values)

    def per_level(self, name: str, n_levels: int, levels: list[str]) -> list[Any]:
        values = getattr(self, f"{name}_per_level")
        if values is None:
            return [getattr(self, name)] * n_levels
        if len(values) == 1:
            return values * n_levels
        if len(values) != n_levels:
            raise MergebenchError(f"alf.{name}_per_level has {len(values)} values, but the pool has {n_levels} "
                                  f"levels ({', '.join(levels)}); give one value per level, or one for all")
        return values


def _optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


class ALF(LevelFusion):
    """Gradient-based level-by-level fusion: each fused level trained to reproduce K-means target neurons."""

    name = "alf"
    Params = Params
    info = MethodInfo(kind="fusion", data="unlabeled", stochastic=True)

    def start(self, levels: list[str], ctx: RunContext) -> None:
        p = self.params
        self.optimizers = p.per_level("optimizer", len(levels), levels)
        self.lrs = p.per_level("lr", len(levels), levels)
        self.epochs = p.per_level("epochs", len(levels), levels)
        self.generator = ctx.generator()

    def fit_level(self, step: LevelStep) -> dict[str, Any]:
        p, acts, i = self.params, step.acts, step.index
        kd = step.last and p.kd_on_head
        if kd:
            probs = torch.stack([F.softmax(a.double() / p.kd_temperature, -1) for a in acts]).mean(0)
            targets = Targets(probs, [torch.arange(a.shape[1]) for a in acts])
        elif p.targets == "hungarian" or step.last:
            targets = hungarian_targets(acts, step.importance, identity=step.last)
        else:
            targets = kmeans_targets(acts, step.importance, acts[0].shape[1], restarts=p.kmeans_restarts,
                                     generator=self.generator)
        if step.level.residual and p.align_residual and not step.last:
            targets = match_to_inputs(targets, features_last(step.inputs, step.axis))
        weights = _unit_weights(targets, step.importance)
        return train_level(step.module, step.inputs, targets.values, step.axis, weights, kd=kd,
                           temperature=p.kd_temperature, optimizer=self.optimizers[i], lr=self.lrs[i],
                           weight_decay=p.weight_decay, epochs=self.epochs[i], batch_size=p.batch_size,
                           patience=p.patience, val_fraction=p.val_fraction, generator=self.generator)


def _unit_weights(targets: Targets, importance: list[torch.Tensor]) -> torch.Tensor:
    """Each target unit weighs the summed importance of the neurons that formed it (mean 1), as the reference's
    weighted loss does."""
    k = targets.values.shape[1]
    w = torch.zeros(k, dtype=torch.float64)
    for assign, s in zip(targets.assignment, importance):
        keep = assign >= 0
        w.index_add_(0, assign[keep], s[keep])
    w = w.clamp_min(1e-12)
    return (w * (k / w.sum())).float()


def train_level(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, axis: int, weights: torch.Tensor,
                *, kd: bool = False, temperature: float = 2.0, optimizer: str = "adam", lr: float = 1e-3,
                weight_decay: float = 1e-4, epochs: int = 100, batch_size: int = 32, patience: int = 15,
                val_fraction: float = 0.2, generator: torch.Generator | None = None) -> dict[str, Any]:
    """Train `module` (in place) so that module(inputs) reproduces `targets` ((rows, units), rows sample-major as
    `features_last` gives them), on 1 − `val_fraction` of the samples, keeping the weights with the lowest held-out
    loss (the starting weights included). Returns what happened (epochs, losses, weight change)."""
    n = inputs.shape[0]
    units = targets.shape[1]
    target = targets.float().reshape(n, -1, units)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=gen)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val, train = order[:n_val], order[n_val:]
    weights = weights.to(target.device)

    def loss_of(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = features_last(module(x), axis).reshape(len(x), -1, units)
        if kd:
            return F.kl_div(F.log_softmax(y / temperature, -1), t, reduction="batchmean") * temperature**2
        return ((y - t) ** 2 * weights).mean()

    def held_out() -> float:
        with torch.no_grad():
            return float(sum(loss_of(inputs[idx], target[idx]) * len(idx)
                             for idx in val.split(max(batch_size, 256))) / len(val))

    was_training = module.training
    module.eval()  # no dropout: the level must reproduce deterministic targets
    before = nn.utils.parameters_to_vector(module.parameters()).detach().clone()
    start = best = held_out()
    best_state = copy.deepcopy(module.state_dict())
    opt = _optimizer(optimizer, module.parameters(), lr, weight_decay)
    waited, ran = 0, 0
    with torch.enable_grad():
        for _ in range(epochs):
            ran += 1
            for idx in train[torch.randperm(len(train), generator=gen)].split(batch_size):
                loss = loss_of(inputs[idx], target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            current = held_out()
            if current < best:
                best, best_state, waited = current, copy.deepcopy(module.state_dict()), 0
            else:
                waited += 1
                if waited >= patience:
                    break
    module.load_state_dict(best_state)
    module.train(was_training)
    change = float((nn.utils.parameters_to_vector(module.parameters()).detach() - before).norm())
    return {"epochs": ran, "held_out_start": round(start, 6), "held_out_best": round(best, 6),
            "weight_change": round(change, 6)}


@hookimpl
def register_methods(register):
    register(ALF)
