"""Git Re-Basin (Ainsworth, Hayase and Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
ICLR 2023), weight matching.

Models trained from different random initialisations hold their hidden units in unrelated orders, so their plain
average is a poor model. Git Re-Basin permutes the units of each model so that its weights best match a reference
model's (maximising Σ ⟨W_ref, π(W)⟩ by coordinate ascent over the permutations, each step a linear assignment
problem), which leaves every model's function unchanged, and then averages the aligned weights.

Conventions and defaults:
- the reference is the pool's first model (`expert_names[0]`); every other model is matched onto it on its own,
  then all are averaged uniformly (for two models exactly the paper's midpoint; for more, the star-shaped variant);
- `matching` = "weight": data-free weight matching (the paper's activation matching and straight-through estimator
  are not implemented yet);
- `max_iter` = 100 sweeps over the permutations at most, as in the paper's code; the visiting order is drawn from the
  run's seed, and the search stops at the first sweep that improves nothing.
Which tensor axes share a permutation comes from the pool (`ModelPool.permutation_spec`); tensors outside the spec,
and integer buffers, are averaged unaligned (floats) or taken from the reference (integers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MergebenchError, MergeOutput, Method, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.alignment import apply_permutation, weight_matching

MATCHINGS = ("weight",)


@dataclass
class Params:
    matching: str = "weight"
    """How units are matched: "weight" (data-free weight matching; the only one implemented so far)."""
    max_iter: int = 100
    """At most this many sweeps over the permutations (the search usually stops after a few)."""

    def __post_init__(self) -> None:
        if self.matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {', '.join(repr(m) for m in MATCHINGS)}, got "
                             f"{self.matching!r} (activation matching is not implemented yet)")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {self.max_iter}")


def uniform_average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The entry-wise mean of floating tensors (computed in float32, stored in the first state's dtype); other
    tensors (integer buffers such as step counters) come from the first state."""
    first = states[0]
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in first.items()}


class GitRebasin(Method):
    """Permute every model onto the first by weight matching, then average the aligned weights."""

    name = "git_rebasin"
    Params = Params
    info = MethodInfo(kind="fusion", data="none")

    @classmethod
    def cannot_run_on(cls, pool: ModelPool) -> str | None:
        """No parameter makes up for a missing spec: the cell is refused even when the user names the method."""
        if pool.permutation_spec() is None:
            return (f"pool {pool.name!r} declares no permutation spec, so its hidden units cannot be aligned; the "
                    f"pool's permutation_spec() must return a mergebench_core.alignment.PermutationSpec (for a chain "
                    f"of Linear layers, mlp_permutation_spec([...layer names...]))")
        if len(pool.expert_names) < 2:
            return f"pool {pool.name!r} has fewer than two models to fuse"
        return super().cannot_run_on(pool)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        reason = self.cannot_run_on(pool)
        if reason is not None:
            raise MergebenchError(f"git_rebasin cannot fuse this pool: {reason}")
        spec = pool.permutation_spec()
        assert spec is not None
        names = pool.expert_names
        reference = pool.state_dict(names[0])
        generator = ctx.generator()
        aligned = [reference]
        moved: dict[str, dict[str, int]] = {}
        for name in ctx.track(names[1:], desc="weight matching"):
            state = pool.state_dict(name)
            perms = weight_matching(spec, reference, state, max_iter=self.params.max_iter, generator=generator)
            aligned.append(apply_permutation(spec, state, perms))
            moved[name] = {p: int((perm != torch.arange(len(perm))).sum()) for p, perm in perms.items()}
        model = pool.load_model(names[0])
        model.load_state_dict(uniform_average(aligned))
        return MergeOutput(model, extras={"reference": names[0], "matching": self.params.matching,
                                          "units_moved": moved})


@hookimpl
def register_methods(register):
    register(GitRebasin)
