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

from mergebench_core import MethodInfo, ModelPool, hookimpl
from mergebench_core.fusion.level_fusion import LevelFusion, LevelFusionParams, LevelStep
from mergebench_core.fusion.levels import (
    LINEAR_LEVELS,
    Targets,
    fit_linear_level,
    hungarian_targets,
    kmeans_targets,
    linear_projection,
)

Params = LevelFusionParams
"""HF fusion's parameters: the fusion samples and the neuron importance, which every level fusion has."""


@dataclass
class KFParams(LevelFusionParams):
    restarts: int = 3
    """K-means runs per level (the first from the first model's neurons); the lowest cost wins."""
    max_iter: int = 100
    """Lloyd iterations per run at most."""
    at_least = {"restarts": 1, "max_iter": 1}


def non_linear_levels(pool: ModelPool) -> list[str]:
    """The pool's levels that are not one Linear or Conv2d layer ("module (Type)")."""
    spec = pool.permutation_spec()
    build = getattr(pool, "build_model", None)  # an untrained instance, when the pool can make one without a build
    model = build() if build is not None else pool.load_model(pool.expert_names[0])
    modules = dict(model.named_modules())
    return [f"{lv.module} ({type(modules[lv.module]).__name__})" for lv in spec.levels
            if not isinstance(modules.get(lv.module), LINEAR_LEVELS)]


class LinearFusion(LevelFusion):
    """Level by level: target neurons from the base models, then the least-squares fit of each fused level."""

    name = "linear_fusion"
    Params = Params

    @classmethod
    def refusal(cls, pool: ModelPool, params: Any) -> str | None:
        reason = super().refusal(pool, params)
        if reason is None:
            odd = non_linear_levels(pool)
            if odd:
                reason = (f"{cls.name} fits every level in closed form, so each level must be one nn.Linear or "
                          f"nn.Conv2d, and pool {pool.name!r} has levels {', '.join(odd)}; use alf (gradient-based "
                          f"fusion per level) on this pool")
        return reason

    def targets(self, step: LevelStep) -> Targets:
        raise NotImplementedError

    def fit_level(self, step: LevelStep) -> dict[str, Any]:
        targets = self.targets(step)
        residual = fit_linear_level(step.module, step.inputs, targets.values, level=step.level.module,
                                    n_examples=step.n_examples)
        return {"fit_residual": round(residual, 6), "matching_cost": round(targets.cost, 6)}


class HFFusion(LinearFusion):
    """Hungarian targets: each model's neurons matched one-to-one to the first model's, then least squares."""

    name = "hf_fusion"
    Params = Params

    def targets(self, step: LevelStep) -> Targets:
        projections = None if step.last else [
            linear_projection(step.module, step.inputs, a, level=step.level.module, n_examples=step.n_examples)
            for a in step.acts]
        return hungarian_targets(step.acts, step.importance, projections, identity=step.last)


class KFFusion(LinearFusion):
    """K-means targets: all models' neurons clustered into the level's width, then least squares."""

    name = "kf_fusion"
    Params = KFParams
    info = MethodInfo(kind="fusion", data="unlabeled", stochastic=True)

    def targets(self, step: LevelStep) -> Targets:
        width = step.module.weight.shape[0]
        return kmeans_targets(step.acts, step.importance, width, restarts=self.params.restarts,
                              max_iter=self.params.max_iter, generator=step.ctx.generator(), identity=step.last)


@hookimpl
def register_methods(register):
    register(HFFusion)
    register(KFFusion)
