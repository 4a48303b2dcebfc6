"""HF and KF linear fusion ("Model Fusion via Neuron Interpolation", the neuron-interpolation paper; reference code
AndrewSpano/neuron-interpolation-model-fusion, `fusion_algorithms/hf_kf.py`): fuse independently trained models
level by level, each level fitted in closed form by least squares.

For each level of the pool (`PermutationSpec.levels`, in forward order; here every level must be one `nn.Linear` or
`nn.Conv2d`):
1. the fused model built so far (a copy of the first model, its levels replaced one by one) gives the level's input
   X on the fusion samples; every base model gives its own outputs A_k of that level (pre-activations);
2. target neurons: `hf_fusion` matches each model's neurons one-to-one to the first model's (Hungarian assignment of
   the cost s_i‖ŷ − a_i‖ + s_j‖ŷ − b_j‖, ŷ the importance-weighted mean of the two neurons' least-squares
   reproductions from X, as the reference code scores pairs); `kf_fusion` clusters all models' neurons into as many
   targets as the level has units (weighted K-means over activation vectors); a target is the importance-weighted
   mean of its members' activations. The output level keeps the class order and averages the logits;
3. the fused level's weights and bias are the least-squares fit of the targets from X (float64), the solution
   closest to the level's starting weights (the first model's): inputs that never fire on the fusion samples keep
   their weights instead of being zeroed by a minimum-norm solution, so fusing a model with a permuted copy of
   itself returns the same function everywhere, not only on the fusion samples.

Conventions and defaults (reference code defaults in brackets where they differ):
- `num_fusion_samples` = 512 inputs from the start of the task pool's train split (the paper samples a balanced
  subset, 400 to 5000 images); least squares needs at least as many rows as unknowns per neuron, so a level with d
  inputs needs d + 1 samples (a convolution counts every output position as a row); fewer is refused, saying how
  many;
- `importance` = "uniform" (the paper also uses Captum's conductance and DeepLIFT scores; "activation" weighs each
  neuron by its mean absolute activation);
- `hf_fusion` with more than two models matches each to the first on its own (the reference fuses two);
- `kf_fusion`: Lloyd's algorithm with squared distances, `restarts` = 3 runs [10], the first from the first model's
  neurons, the others from k-means++ draws of the cell's seed; the lowest cost wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergebench_core import MergebenchError, MergeOutput, Method, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.fusion.alignment import collect_activations
from mergebench_core.fusion.levels import (
    IMPORTANCES,
    LINEAR_LEVELS,
    Targets,
    cannot_fuse,
    capture_level,
    fit_linear_level,
    hungarian_targets,
    kmeans_targets,
    linear_projection,
    neuron_importance,
)
from mergebench_core.pools.states import load_states
from mergebench_core.data.statistics import StatsCache


@dataclass
class Params:
    num_fusion_samples: int = 512
    """Inputs (from the start of each task's train split) on which levels are matched and fitted."""
    importance: str = "uniform"
    """Neuron importance: "uniform" or "activation" (mean absolute activation)."""

    def __post_init__(self) -> None:
        if self.num_fusion_samples < 1:
            raise ValueError(f"num_fusion_samples must be at least 1, got {self.num_fusion_samples}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")


@dataclass
class KFParams(Params):
    restarts: int = 3
    """K-means runs per level (the first from the first model's neurons); the lowest cost wins."""
    max_iter: int = 100
    """Lloyd iterations per run at most."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.restarts < 1 or self.max_iter < 1:
            raise ValueError("restarts and max_iter must be at least 1")


def non_linear_levels(pool: ModelPool) -> list[str]:
    """The pool's levels that are not one Linear or Conv2d layer ("module (Type)")."""
    spec = pool.permutation_spec()
    build = getattr(pool, "build_model", None)  # an untrained instance, when the pool can make one without a build
    model = build() if build is not None else pool.load_model(pool.expert_names[0])
    modules = dict(model.named_modules())
    return [f"{lv.module} ({type(modules[lv.module]).__name__})" for lv in spec.levels
            if not isinstance(modules.get(lv.module), LINEAR_LEVELS)]


class LinearFusion(Method):
    """Level by level: target neurons from the base models, then the least-squares fit of each fused level."""

    name = "linear_fusion"
    Params = Params
    info = MethodInfo(kind="fusion", data="unlabeled")
    targets_label = ""

    @classmethod
    def cannot_run_on(cls, pool: ModelPool) -> str | None:
        reason = cannot_fuse(pool, levels=True)
        if reason is None:
            odd = non_linear_levels(pool)
            if odd:
                reason = (f"{cls.name} fits every level in closed form, so each level must be one nn.Linear or "
                          f"nn.Conv2d, and pool {pool.name!r} has levels {', '.join(odd)}; use alf (gradient-based "
                          f"fusion per level) on this pool")
        return reason or super().cannot_run_on(pool)

    def targets(self, acts: list[torch.Tensor], importance: list[torch.Tensor], module: nn.Module,
                inputs: torch.Tensor, last: bool, ctx: RunContext, level: str, n_examples: int) -> Targets:
        raise NotImplementedError

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        reason = self.cannot_run_on(pool)
        if reason is not None:
            raise MergebenchError(f"{self.name} cannot fuse this pool: {reason}")
        if ctx.taskpool is None:
            raise MergebenchError(f"{self.name} needs the task pool's train inputs")
        spec = pool.permutation_spec()
        names = pool.expert_names
        load_states(pool, names)  # one architecture, or a clear error
        tasks = list(ctx.tasks or ctx.taskpool.tasks)
        n = self.params.num_fusion_samples
        cache = StatsCache.for_context(ctx)
        models = [pool.load_model(name) for name in names]
        for m in models:
            spec.validate_model(m)
        points = [lv.module for lv in spec.levels]
        outputs = [collect_activations(m, ctx.taskpool, tasks, points, n_examples=n, cache=cache,
                                       model_identity=pool.identity(name), feature_axes=spec.feature_axes)
                   for m, name in zip(models, names)]
        fused = pool.load_model(names[0])
        report: dict[str, Any] = {}
        for i, level in enumerate(ctx.track(spec.levels, desc=f"{self.name} levels")):
            module = fused.get_submodule(level.module)
            inputs, _ = capture_level(fused, level.module, ctx.taskpool, tasks, n_examples=n)
            acts = [out[level.module] for out in outputs]
            importance = [neuron_importance(a, self.params.importance) for a in acts]
            targets = self.targets(acts, importance, module, inputs, i == len(spec.levels) - 1, ctx, level.module,
                                   n * len(tasks))
            residual = fit_linear_level(module, inputs, targets.values, level=level.module,
                                        n_examples=n * len(tasks))
            report[level.module] = {"fit_residual": round(residual, 6), "matching_cost": round(targets.cost, 6)}
        return MergeOutput(fused.eval(), extras={"reference": names[0], "levels": report,
                                                 "num_fusion_samples": n})


class HFFusion(LinearFusion):
    """Hungarian targets: each model's neurons matched one-to-one to the first model's, then least squares."""

    name = "hf_fusion"
    Params = Params
    info = MethodInfo(kind="fusion", data="unlabeled")

    def targets(self, acts, importance, module, inputs, last, ctx, level, n_examples):
        projections = None if last else [linear_projection(module, inputs, a, level=level, n_examples=n_examples)
                                         for a in acts]
        return hungarian_targets(acts, importance, projections, identity=last)


class KFFusion(LinearFusion):
    """K-means targets: all models' neurons clustered into the level's width, then least squares."""

    name = "kf_fusion"
    Params = KFParams
    info = MethodInfo(kind="fusion", data="unlabeled", stochastic=True)

    def targets(self, acts, importance, module, inputs, last, ctx, level, n_examples):
        width = module.weight.shape[0]
        return kmeans_targets(acts, importance, width, restarts=self.params.restarts, max_iter=self.params.max_iter,
                              generator=ctx.generator(), identity=last)


@hookimpl
def register_methods(register):
    register(HFFusion)
    register(KFFusion)
