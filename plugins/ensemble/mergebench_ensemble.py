"""Output ensembles as reference rows: every expert is kept and their logits are averaged at evaluation time
(`mergebench_core.data.evaluation`), which is the usual upper-ish baseline for merging at N times the inference cost.

- `ensemble`: equal weights (FusionBench's `simple_ensemble`).
- `weighted_ensemble`: one weight per expert, in pool order (FusionBench's `weighted_ensemble`; its default of no
  weights means equal weights, as here). The evaluation loop always divides by the sum of the weights, so the
  weights need not be normalised: FusionBench's `normalize` switch has no counterpart because it would change
  nothing here. Weights must be non-negative with a positive sum.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergebench_core import Ensemble, MergebenchError, MergeOutput, Method, MethodInfo, ModelPool, RunContext
from mergebench_core import hookimpl
from mergebench_core.engine.averaging import normalized


@dataclass
class EnsembleParams:
    """The plain ensemble has no parameters."""


@dataclass
class WeightedParams:
    weights: list[float] | None = None
    """One non-negative weight per expert, in pool order; None gives every expert the same weight."""

    def __post_init__(self) -> None:
        if self.weights is not None:
            if any(w < 0 for w in self.weights):
                raise ValueError(f"ensemble weights must be non-negative, got {list(self.weights)}")
            if sum(self.weights) <= 0:
                raise ValueError(f"ensemble weights must have a positive sum, got {list(self.weights)}")


def load_ensemble(pool: ModelPool, ctx: RunContext, weights: list[float] | None) -> MergeOutput:
    names = pool.expert_names
    if weights is not None and len(weights) != len(names):
        raise MergebenchError(f"weights has {len(weights)} entries but pool {pool.name!r} has {len(names)} experts "
                              f"({', '.join(names)}); give one per expert")
    models = [pool.load_model(n) for n in ctx.track(names, desc="loading experts", total=len(names))]
    extras = {"models": list(names)}
    if weights is not None:
        extras["weights"] = normalized(weights)
    return MergeOutput(Ensemble(models, None if weights is None else [float(w) for w in weights]), extras=extras)


class SimpleEnsemble(Method):
    """All experts, their logits averaged with equal weights."""

    name = "ensemble"
    Params = EnsembleParams
    info = MethodInfo(kind="ensemble", data="none")

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        return load_ensemble(pool, ctx, None)


class WeightedEnsemble(Method):
    """All experts, their logits averaged with the given weights."""

    name = "weighted_ensemble"
    Params = WeightedParams
    info = MethodInfo(kind="ensemble", data="none")

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        return load_ensemble(pool, ctx, self.params.weights)


@hookimpl
def register_methods(register):
    register(SimpleEnsemble)
    register(WeightedEnsemble)
