"""Align-to-first fusion: move every model's hidden units into the first model's order, then average.

Git Re-Basin (permutations found by weight or activation matching) and OTFusion (optimal-transport plans) differ
only in how they align one model onto another. Everything around that is one procedure, owned here by
`AlignToFirst`: refuse pools that cannot be fused, read activations when the method's parameters ask for them, align
every other model onto the pool's first (the reference; for two models the paper's midpoint, for more the
star-shaped variant), then average the reference and the aligned models uniformly.

The average is the one rule: floating tensors accumulated in `average_dtype` and cast back to their dtype, integer
buffers from the reference. float64 is the default: a few float32 tensors sum exactly in float64, so the mean is
rounded once, when it is cast back; OTFusion always averaged so. For two models float32 gives the very same bits
(halving is exact, so rounding the sum and then halving is rounding the mean), but for three or more it may differ
in the last bit. Git Re-Basin averaged in float32 before this base existed, and its weights on a pool of four models
(digits-mlp_split4) do differ under float64, so it declares `average_dtype = "float32"` to keep its stored numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from mergebench_core.contract.api import MergeOutput, Method, MethodInfo, ModelPool, RunContext
from mergebench_core.data.statistics import StatsCache
from mergebench_core.engine.averaging import mean_state
from mergebench_core.errors import MergebenchError
from mergebench_core.fusion.alignment import PermutationSpec, apply_permutation, unit_activations
from mergebench_core.fusion.fusion_run import open_fusion
from mergebench_core.fusion.levels import cannot_fuse, missing_points

AVERAGE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
State = dict[str, torch.Tensor]
Activations = Mapping[str, torch.Tensor]


def permuted(spec: PermutationSpec, state: State, perms: Mapping[str, torch.Tensor]) -> tuple[State, dict[str, int]]:
    """`state` with `perms` applied (`alignment.apply_permutation`), and how many units each permutation moved."""
    moved = {p: int((perm != torch.arange(len(perm))).sum()) for p, perm in perms.items()}
    return apply_permutation(spec, state, dict(perms)), moved


class AlignToFirst(Method):
    """Align every model onto the pool's first, then average the aligned models.

    A subclass gives `align` (one model onto the reference) and, when some parameter values make it read activations,
    declares them in `activation_values` and names the setting that avoids them in `data_free_hint` (for errors).
    `report_key` names the extras entry that holds `align`'s report for each model; `describe` adds run-wide extras.
    """

    info: ClassVar[MethodInfo] = MethodInfo(kind="fusion", data="none")
    average_dtype: ClassVar[str] = "float64"
    """"float64" or "float32": the dtype the aligned models are averaged in (see the module docstring)."""
    report_key: ClassVar[str] = "alignment"
    activation_values: ClassVar[Mapping[str, Sequence[Any]]] = {}
    """Parameter → the values of it that make the method read the models' activations at the spec's points."""
    data_free_hint: ClassVar[str] = ""
    """The parameter setting that needs no activations, as a user types it (`git_rebasin.matching=weight`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.average_dtype not in AVERAGE_DTYPES:
            raise TypeError(f"{cls.__name__}.average_dtype is {cls.average_dtype!r}; use one of "
                            f"{', '.join(AVERAGE_DTYPES)}")

    @classmethod
    def uses_activations(cls, params: Any) -> bool:
        """Whether `params` make the method read activations (see `activation_values`)."""
        return any(getattr(params, name) in values for name, values in cls.activation_values.items())

    def align(self, spec: PermutationSpec, reference: State, other: State, acts_ref: Activations | None,
              acts_other: Activations | None, generator: torch.Generator) -> tuple[State, Any]:
        """`other` aligned onto `reference` (same tensors, same shapes), and a report of what moved."""
        raise NotImplementedError(f"{type(self).__name__} does not implement align")

    def describe(self) -> dict[str, Any]:
        """Run-wide extras besides the reference and the per-model reports."""
        return {}

    @classmethod
    def refusal(cls, pool: ModelPool, params: Any) -> str | None:
        """A pool without a spec (or with one model) cannot be fused; one whose spec names no activation points
        cannot give activations, which only the activation-based settings of `params` read."""
        reason = cannot_fuse(pool)
        if reason is None and cls.uses_activations(params):
            reason = cls.no_points(pool)
        return reason or super().refusal(pool, params)

    @classmethod
    def no_points(cls, pool: ModelPool) -> str | None:
        """Why the pool's spec cannot give activations (permutations without a point), or None."""
        missing = missing_points(pool.permutation_spec())
        if not missing:
            return None
        hint = f", or use {cls.data_free_hint}" if cls.data_free_hint else ""
        return (f"pool {pool.name!r} names no activation point for permutations {missing}; its permutation spec "
                f"needs PermutationSpec.points (the module whose output carries each permutation's units){hint}")

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        needs_data = self.uses_activations(self.params)
        if needs_data and cannot_fuse(pool) is None:
            reason = self.no_points(pool)
            if reason is not None:
                raise MergebenchError(f"{self.name} cannot read activations: {reason}")
        start = open_fusion(self, pool, ctx, needs_data=needs_data)
        names, reference = start.names, start.states[start.names[0]]
        acts: dict[str, Activations] = {}
        if needs_data:
            assert start.taskpool is not None
            cache = StatsCache.for_context(ctx)
            acts = {n: unit_activations(start.spec, pool.load_model(n), start.taskpool, start.tasks,
                                        n_examples=self.params.num_fusion_samples, cache=cache,
                                        model_identity=pool.identity(n)) for n in names}
        generator = ctx.generator()
        aligned, reports = [reference], {}
        for name in ctx.track(names[1:], desc=f"{self.name}: aligning onto {names[0]}"):
            moved, reports[name] = self.align(start.spec, reference, start.states[name], acts.get(names[0]),
                                              acts.get(name), generator)
            aligned.append(moved)
        model = pool.load_model(names[0])
        model.load_state_dict(mean_state(aligned, dtype=AVERAGE_DTYPES[self.average_dtype]))
        return MergeOutput(model, extras={"reference": names[0], self.report_key: reports, **self.describe()})
