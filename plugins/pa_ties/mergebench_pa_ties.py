"""Preference-aware TIES-Merging: TIES (Yadav et al., "TIES-Merging: Resolving interference when merging models",
NeurIPS 2023) with each trimmed task vector weighted by w_t = T · r_t.

r is the cell's preference over its T tasks (normalised to sum 1), so the uniform preference gives w_t = 1 and plain
`ties` bit for bit; a vertex of the simplex gives w = T on one task and 0 on the others. Without a preference (or
through `mergebench merge`, which has none) the method is `ties`. Every other parameter and convention — `k`,
`scope`, `combine`, λ = `scaling_factor`, exact ⌊k·n⌋ trimming with ties to the earlier entry, + elected where a
column's sum is exactly 0 — is the `ties` plugin's: both are the core's task-vector pipeline
(`mergebench_core.engine.pipeline`), this one with a weight stage.

The steps, for each task t:

1. Trim: keep the top ⌊k·n⌋ entries of the *unweighted* τ_t by magnitude (over the whole model or per tensor, as
   `scope` says). The preference changes how much each kept entry counts, never which entries are kept: a weight
   of 0 does not turn a task's trim into ⌊k·n⌋ arbitrary zeros, and rounding in w_t·τ_t cannot reorder magnitudes.
2. Weight: τ̂_t = w_t · trim(τ_t).
3. Elect: per entry, the sign of Σ_t τ̂_t (`weighted_election=True`, the default) or of Σ_t trim(τ_t)
   (`weighted_election=False`: the election ignores the preference, which then acts only in step 4).
4. Combine the weighted entries τ̂_t that agree with the elected sign: their "sum", or their "mean" over the
   entries that are non-zero after weighting (a task of weight 0 takes no part). θ = θ_0 + λ · combined.

Which election the literature uses: the weighted one. MergeKit's `ties` with per-model `weight`s (the common
implementation of weighted TIES) trims each task vector unweighted, multiplies by the weights, elects the sign from
the sum of the weighted trimmed vectors, and sums the weighted agreeing entries; the description of the
preference-aware merging benchmark this plugin serves likewise elects on the weighted trimmed vectors. The TIES
paper itself has no per-task weights. `weighted_election=False` is offered as an ablation: with it, a task the user
cares little about still votes with its full magnitude, and can veto a preferred task's entry. (MergeKit's
normalised variant divides by the sum of the agreeing weights instead of their count; that would cancel the
preference wherever one task alone contributes, so "mean" here is TIES's disjoint mean of the weighted entries.)

Cost: the same as `ties`: the exact thresholds of the unweighted vectors come from a sample and one counting pass,
and the merge streams in blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mergebench_ties import Params as TiesParams
from mergebench_ties import Ties, ties_pipeline

from mergebench_core import MergebenchError, MergeOutput, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.engine.pipeline import Pipeline
from mergebench_core.engine.task_vector_stages import combine


@dataclass
class Params(TiesParams):
    weighted_election: bool = True
    """Elect each entry's sign from the weighted trimmed vectors (true, as MergeKit's weighted TIES does) or from
    the unweighted ones (false: the preference then weights only the combination)."""


def weighted_elect_and_combine(trimmed: torch.Tensor, weights: torch.Tensor, combine_how: str,
                               weighted_election: bool = True) -> torch.Tensor:
    """TIES's election and combination of trimmed task vectors (T, ...) weighted by `weights` (T,). With every
    weight 1 this is `mergebench_ties.elect_and_combine`, bit for bit."""
    flat = trimmed.reshape(len(trimmed), -1)
    pipe = Pipeline(elect=True, combine=combine_how, elect_on="weighted" if weighted_election else "unweighted")
    weighted = flat * weights.to(flat.dtype).view(-1, 1)
    return combine(weighted, pipe, flat).view(trimmed.shape[1:])


def expert_weights(ctx: RunContext, tasks: list[str]) -> torch.Tensor | None:
    """w = T · r for each expert's task (float32), or None when the cell names no tasks (plain TIES)."""
    prefs = ctx.task_weights()
    if not prefs:
        return None
    missing = sorted({t for t in tasks if t not in prefs})
    if missing:
        raise MergebenchError(f"pa_ties: the preference is over tasks {', '.join(prefs)}, but the pool has experts for "
                              f"{', '.join(missing)}; select the same tasks for both (--tasks)")
    return torch.tensor([len(prefs) * prefs[t] for t in tasks], dtype=torch.float32)


class PreferenceTies(Ties):
    """TIES with each expert's trimmed task vector weighted by T times the preference for its task."""

    name = "pa_ties"
    Params = Params
    info = MethodInfo(kind="merge", data="none", preference_aware=True)

    def __init__(self, params: Params | None = None):
        super().__init__(params)
        self.weights: torch.Tensor | None = None
        """Per expert, in pool order; None merges with plain `ties`."""

    def pipeline(self) -> Pipeline:
        pipe = ties_pipeline(self.params)
        if self.weights is None:
            return pipe
        return Pipeline(keep=pipe.keep, scope=pipe.scope, elect=True, combine=pipe.combine, scale=pipe.scale,
                        weights=tuple(float(w) for w in self.weights),
                        elect_on="weighted" if self.params.weighted_election else "unweighted")

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        tasks = [pool.task_of(e) for e in pool.expert_names]
        self.weights = expert_weights(ctx, tasks)
        output = super().run(pool, ctx)
        if self.weights is not None:
            output.extras["preference"] = ctx.task_weights()
            output.extras["task_weights"] = dict(zip(tasks, self.weights.tolist()))
            output.extras["weighted_election"] = self.params.weighted_election
        return output


@hookimpl
def register_methods(register):
    register(PreferenceTies)
