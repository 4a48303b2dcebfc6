"""Git Re-Basin (Ainsworth, Hayase and Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
ICLR 2023), weight matching and activation matching.

Models trained from different random initialisations hold their hidden units in unrelated orders, so their plain
average is a poor model. Git Re-Basin permutes the units of each model so that its weights best match a reference
model's (maximising Σ ⟨W_ref, π(W)⟩ by coordinate ascent over the permutations, each step a linear assignment
problem), which leaves every model's function unchanged, and then averages the aligned weights.

Conventions and defaults:
- the reference is the pool's first model (`expert_names[0]`); every other model is matched onto it on its own,
  then all are averaged uniformly (for two models exactly the paper's midpoint; for more, the star-shaped variant);
- `matching` = "weight": data-free weight matching; "activation": activation matching, one linear assignment per
  permutation maximising the correlation of the two models' activations at the points the pool declares
  (`PermutationSpec.points`) on `num_fusion_samples` = 512 train inputs (cached with the other statistics); the
  paper's straight-through estimator is not implemented;
- `max_iter` = 100 sweeps over the permutations at most (weight matching), as in the paper's code; the visiting order
  is drawn from the run's seed, and the search stops at the first sweep that improves nothing.
Which tensor axes share a permutation comes from the pool (`ModelPool.permutation_spec`); tensors outside the spec,
and integer buffers, are averaged unaligned (floats) or taken from the reference (integers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MergebenchError, MergeOutput, Method, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.fusion.alignment import activation_matching, apply_permutation, unit_activations, weight_matching
from mergebench_core.fusion.levels import cannot_fuse, missing_points
from mergebench_core.pools.states import load_states
from mergebench_core.data.statistics import StatsCache

MATCHINGS = ("weight", "activation")


@dataclass
class Params:
    matching: str = "weight"
    """How units are matched: "weight" (data-free weight matching) or "activation" (activation matching)."""
    max_iter: int = 100
    """At most this many sweeps over the permutations (the search usually stops after a few)."""
    num_fusion_samples: int = 512
    """Activation matching: train inputs per task whose activations are compared."""

    def __post_init__(self) -> None:
        if self.matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {', '.join(repr(m) for m in MATCHINGS)}, got "
                             f"{self.matching!r}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {self.max_iter}")
        if self.num_fusion_samples < 1:
            raise ValueError(f"num_fusion_samples must be at least 1, got {self.num_fusion_samples}")


def uniform_average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The entry-wise mean of floating tensors (computed in float32, stored in the first state's dtype); other
    tensors (integer buffers such as step counters) come from the first state."""
    first = states[0]
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in first.items()}


class GitRebasin(Method):
    """Permute every model onto the first by weight (or activation) matching, then average the aligned weights."""

    name = "git_rebasin"
    Params = Params
    info = MethodInfo(kind="fusion", data="none")

    @classmethod
    def cannot_run_on(cls, pool: ModelPool) -> str | None:
        """No parameter makes up for a missing spec: the cell is refused even when the user names the method."""
        return cannot_fuse(pool) or super().cannot_run_on(pool)

    @classmethod
    def unsuitable_for(cls, pool: ModelPool, params: Params) -> str | None:
        reason = super().unsuitable_for(pool, params)
        if reason is None and params.matching == "activation":
            reason = _no_points(pool)
        return reason

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        reason = self.cannot_run_on(pool)
        if reason is not None:
            raise MergebenchError(f"git_rebasin cannot fuse this pool: {reason}")
        spec = pool.permutation_spec()
        assert spec is not None
        names = pool.expert_names
        states = load_states(pool, names)
        reference = states[names[0]]
        generator = ctx.generator()
        aligned = [reference]
        moved: dict[str, dict[str, int]] = {}
        acts = self._activations(pool, ctx) if self.params.matching == "activation" else {}
        for name in ctx.track(names[1:], desc=f"{self.params.matching} matching"):
            state = states[name]
            if self.params.matching == "activation":
                perms = activation_matching(spec, acts[names[0]], acts[name])
            else:
                perms = weight_matching(spec, reference, state, max_iter=self.params.max_iter, generator=generator)
            aligned.append(apply_permutation(spec, state, perms))
            moved[name] = {p: int((perm != torch.arange(len(perm))).sum()) for p, perm in perms.items()}
        model = pool.load_model(names[0])
        model.load_state_dict(uniform_average(aligned))
        return MergeOutput(model, extras={"reference": names[0], "matching": self.params.matching,
                                          "units_moved": moved})

    def _activations(self, pool: ModelPool, ctx: RunContext) -> dict[str, dict[str, torch.Tensor]]:
        reason = _no_points(pool)
        if reason is not None:
            raise MergebenchError(f"git_rebasin cannot match activations: {reason}")
        if ctx.taskpool is None:
            raise MergebenchError("activation matching needs the task pool's train inputs")
        spec = pool.permutation_spec()
        tasks = list(ctx.tasks or ctx.taskpool.tasks)
        cache = StatsCache.for_context(ctx)
        return {name: unit_activations(spec, pool.load_model(name), ctx.taskpool, tasks,
                                       n_examples=self.params.num_fusion_samples, cache=cache,
                                       model_identity=pool.identity(name))
                for name in pool.expert_names}


def _no_points(pool: ModelPool) -> str | None:
    missing = missing_points(pool.permutation_spec())
    if missing:
        return (f"pool {pool.name!r} names no activation point for permutations {missing}; its permutation spec "
                f"needs PermutationSpec.points (the module whose output carries each permutation's units), or use "
                f"git_rebasin.matching=weight")
    return None


@hookimpl
def register_methods(register):
    register(GitRebasin)
