"""Preference-aware TIES-Merging: TIES (Yadav et al., "TIES-Merging: Resolving interference when merging models",
NeurIPS 2023) with each trimmed task vector weighted by w_t = T · r_t.

r is the cell's preference over its T tasks (normalised to sum 1), so the uniform preference gives w_t = 1 and plain
`ties` bit for bit; a vertex of the simplex gives w = T on one task and 0 on the others. Without a preference (or
through `mergebench merge`, which has none) the method is `ties`. Every other parameter and convention — `k`,
`scope`, `combine`, λ = `scaling_factor`, exact ⌊k·n⌋ trimming with ties to the earlier entry, the tensor's majority
sign where a column's sum is exactly 0 — is the `ties` plugin's, whose code this plugin reuses.

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

Cost: with a preference and `scope="global"`, the exact global thresholds come from two streaming radix-select
passes over the unweighted task vectors before the merge pass (`mergebench_core.sparsify.StreamingTopK`, as
`ties`'s exact fallback and `dare_ties` do), not from `ties`'s one-pass sample bracket; the kept entries, and hence
the merge, are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mergebench_ties import Params as TiesParams
from mergebench_ties import Ties, apply, majority_sign, pick_agreeing, sign_balance, signed_sums, sum_rows

from mergebench_core import MergebenchError, MergeOutput, MergeStream, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.sparsify import StreamingTopK, keep_count, topk_mask


@dataclass
class Params(TiesParams):
    weighted_election: bool = True
    """Elect each entry's sign from the weighted trimmed vectors (true, as MergeKit's weighted TIES does) or from
    the unweighted ones (false: the preference then weights only the combination)."""


def weighted_elect_and_combine(trimmed: torch.Tensor, weights: torch.Tensor, combine: str,
                               weighted_election: bool = True) -> torch.Tensor:
    """TIES's election and combination of trimmed task vectors (T, ...) weighted by `weights` (T,); `trimmed` is
    overwritten. With every weight 1 this is `mergebench_ties.elect_and_combine`, bit for bit."""
    flat = trimmed.reshape(len(trimmed), -1)
    unweighted_total = None if weighted_election else sum_rows(flat, torch.empty(flat.shape[1], dtype=flat.dtype))
    weighted = flat.mul_(weights.to(flat.dtype).view(-1, 1))
    sums = signed_sums(weighted, combine)  # (Σ, Σ positive, Σ negative[, counts]) of the weighted entries
    if unweighted_total is not None:
        sums = (unweighted_total, *sums[1:])  # the election reads sums[0]; the combination reads the rest
    return pick_agreeing(sums, majority_sign(sign_balance(sums[0])), combine).view(trimmed.shape[1:])


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
        """Per expert, in pool order; None merges with plain `ties` (its one-pass global selection included)."""

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        tasks = [pool.task_of(e) for e in pool.expert_names]
        self.weights = expert_weights(ctx, tasks)
        output = super().run(pool, ctx)
        if self.weights is not None:
            output.extras["preference"] = ctx.task_weights()
            output.extras["task_weights"] = dict(zip(tasks, self.weights.tolist()))
            output.extras["weighted_election"] = self.params.weighted_election
        return output

    def prepare(self, stream: MergeStream) -> None:
        if self.weights is None:
            super().prepare(stream)
            return
        if len(self.weights) != stream.num_experts:
            raise MergebenchError(f"pa_ties has {len(self.weights)} weights for {stream.num_experts} experts")
        # `ties`'s one-pass state stays empty, so its `finish` has nothing to patch
        self._stream, self._onepass, self._held, self._topk = stream, None, {}, None
        if self.params.scope != "global":
            return
        count = keep_count(self.params.k, stream.numel())
        self.extras["kept_per_task"] = count
        self._topk = StreamingTopK([count] * stream.num_experts)
        for _, taus in stream.task_vectors():  # unweighted: the preference never changes which entries are kept
            self._topk.observe_high(taus)
        for _, taus in stream.task_vectors():
            self._topk.observe_low(taus)

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return super().merge_task_vectors(key, base, taus)
        if self._topk is not None:
            keep = self._topk.mask(taus)
        else:
            count = keep_count(self.params.k, base.numel())
            keep = torch.stack([topk_mask(t, count) for t in taus])
        combined = weighted_elect_and_combine(taus.mul_(keep), self.weights, self.params.combine,
                                              self.params.weighted_election)
        return apply(base, combined, self.params.scaling_factor)


@hookimpl
def register_methods(register):
    register(PreferenceTies)
