"""OTFusion (Singh and Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020): align each model's neurons to the
first model's with an optimal-transport plan, layer after layer, then average.

For every permutation of the pool's spec, in the spec's order (forward order for the pools of this repository), a
ground cost between the other model's units and the reference's units:
- `cost` = "weight": the Euclidean distance between the units' incoming weights (every tensor of the spec in which
  the unit has an axis and whose other axes are already aligned: a layer's weight rows and bias, with their inputs
  already transported, as the paper aligns layer l after layer l − 1);
- `cost` = "activation": the Euclidean distance between the units' activations on `num_fusion_samples` train inputs
  (at the points the pool declares, `PermutationSpec.points`; cached with the other statistics).
The transport plan T between the marginals μ (other) and ν (reference) — uniform, or the units' importance — is
exact (`solver` = "emd": POT's `ot.emd`, network simplex) or entropic (`solver` = "sinkhorn": `ot.sinkhorn` with
regularisation `sinkhorn_reg` times the largest cost). The other model's units are replaced by the barycentric map
diag(1/ν) Tᵀ applied to every axis that carries them (for equal widths and uniform marginals an exact plan is a
permutation, so the model's function is unchanged), and the fused model is the uniform average of the reference and
every aligned model (the reference code averages the same way).

Conventions and defaults: the reference is the pool's first model; `importance` = "uniform" [the paper's default];
"activation" uses each unit's mean absolute activation as its mass. Models of one architecture only (equal widths):
the fused model takes the reference's architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mergebench_core import MergebenchError, MergeOutput, Method, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.fusion.alignment import PermutationSpec, apply_transport, unit_activations, unit_vectors
from mergebench_core.fusion.levels import IMPORTANCES, cannot_fuse, missing_points, neuron_importance
from mergebench_core.pools.states import load_states
from mergebench_core.data.statistics import StatsCache

COSTS = ("weight", "activation")
SOLVERS = ("emd", "sinkhorn")


@dataclass
class Params:
    cost: str = "weight"
    """Ground cost between units: "weight" (incoming weights) or "activation" (activations on train inputs)."""
    solver: str = "emd"
    """"emd" (exact optimal transport) or "sinkhorn" (entropic regularisation)."""
    sinkhorn_reg: float = 0.01
    """Sinkhorn's regularisation, relative to the largest ground cost."""
    importance: str = "uniform"
    """Marginals: "uniform" or "activation" (each unit's mean absolute activation)."""
    num_fusion_samples: int = 512
    """Train inputs per task for activation costs and importance."""

    def __post_init__(self) -> None:
        for field, value, allowed in (("cost", self.cost, COSTS), ("solver", self.solver, SOLVERS),
                                      ("importance", self.importance, IMPORTANCES)):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {', '.join(allowed)}, got {value!r}")
        if self.sinkhorn_reg <= 0:
            raise ValueError(f"sinkhorn_reg must be positive, got {self.sinkhorn_reg}")
        if self.num_fusion_samples < 1:
            raise ValueError(f"num_fusion_samples must be at least 1, got {self.num_fusion_samples}")


def transport_plan(cost: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor, solver: str = "emd",
                   reg: float = 0.01) -> torch.Tensor:
    """(n, m) optimal-transport plan between masses `mu` (n, summing to 1) and `nu` (m) under `cost` (n, m):
    POT's exact `ot.emd`, or `ot.sinkhorn` with regularisation `reg` × the largest cost (float64)."""
    import ot

    c = cost.detach().to("cpu", torch.float64).numpy()
    a = mu.detach().to("cpu", torch.float64).numpy()
    b = nu.detach().to("cpu", torch.float64).numpy()
    if solver == "emd":
        plan = ot.emd(a, b, c)
    elif solver == "sinkhorn":
        scale = float(c.max()) if c.size and float(c.max()) > 0 else 1.0
        plan = ot.sinkhorn(a, b, c / scale, reg, numItermax=10_000)
    else:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    return torch.as_tensor(plan, dtype=torch.float64)


def barycentric_map(plan: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """diag(1/ν) Tᵀ: (target units, source units), row i the weights of the source units that make target unit i."""
    return plan.T / nu.to(torch.float64)[:, None]


def _weight_rows(spec: PermutationSpec, state: dict[str, torch.Tensor], perm: str, done: set[str]) -> torch.Tensor:
    """(units, features): every tensor in which `perm` has an axis and every other permuted axis is in `done`, moved
    to that axis and flattened per unit; all tensors of `perm` when none qualifies."""
    where = spec.perms[perm]
    ready = [(k, a) for k, a in where
             if all(p is None or p == perm or p in done for i, p in enumerate(spec.axes[k]) if i != a)]
    n = state[where[0][0]].shape[where[0][1]] // spec.block(perm)
    rows = [state[k].to(torch.float64).movedim(a, 0).reshape(n, -1) for k, a in (ready or where)]
    return torch.cat(rows, 1)


def _marginal(importance: str, acts: torch.Tensor | None, n: int, block: int) -> torch.Tensor:
    if importance == "uniform" or acts is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    s = neuron_importance(acts, importance)
    s = s.reshape(n, block).sum(1) if block > 1 else s
    return s / s.sum()


def align(spec: PermutationSpec, reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
          params: Params, acts_ref: dict[str, torch.Tensor] | None = None,
          acts_other: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`other` transported onto `reference`'s units, permutation after permutation, and a report per permutation
    (transport cost; whether the plan was a permutation)."""
    current = dict(other)
    maps: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {}
    for perm in spec.perms:
        block = spec.block(perm)
        if params.cost == "activation":
            assert acts_ref is not None and acts_other is not None
            r, o = unit_vectors(acts_ref[perm].double(), block), unit_vectors(acts_other[perm].double(), block)
        else:
            r, o = _weight_rows(spec, reference, perm, set(maps)), _weight_rows(spec, current, perm, set(maps))
        cost = torch.cdist(o, r)
        nu = _marginal(params.importance, acts_ref[perm] if acts_ref else None, r.shape[0], block)
        mu = _marginal(params.importance, acts_other[perm] if acts_other else None, o.shape[0], block)
        plan = transport_plan(cost, mu, nu, params.solver, params.sinkhorn_reg)
        maps[perm] = barycentric_map(plan, nu)
        current = apply_transport(spec, current, {perm: maps[perm]})
        hard = bool(((plan > 1e-12).sum(1) == 1).all() and ((plan > 1e-12).sum(0) == 1).all())
        report[perm] = {"cost": round(float((plan * cost).sum()), 6), "permutation": hard}
    return apply_transport(spec, other, maps), report


class OTFusion(Method):
    """Transport every model onto the first with optimal-transport plans, then average."""

    name = "otfusion"
    Params = Params
    info = MethodInfo(kind="fusion", data="none")

    @classmethod
    def cannot_run_on(cls, pool: ModelPool) -> str | None:
        return cannot_fuse(pool) or super().cannot_run_on(pool)

    @classmethod
    def unsuitable_for(cls, pool: ModelPool, params: Params) -> str | None:
        reason = super().unsuitable_for(pool, params)
        if reason is None and (params.cost == "activation" or params.importance != "uniform"):
            reason = _no_points(pool)
        return reason

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        reason = self.cannot_run_on(pool)
        if reason is not None:
            raise MergebenchError(f"otfusion cannot fuse this pool: {reason}")
        spec = pool.permutation_spec()
        names = pool.expert_names
        states = load_states(pool, names)
        needs_acts = self.params.cost == "activation" or self.params.importance != "uniform"
        acts: dict[str, dict[str, torch.Tensor]] = {}
        if needs_acts:
            reason = _no_points(pool)
            if reason is not None:
                raise MergebenchError(f"otfusion with activation costs or importance: {reason}")
            if ctx.taskpool is None:
                raise MergebenchError("otfusion with activation costs needs the task pool's train inputs")
            tasks = list(ctx.tasks or ctx.taskpool.tasks)
            cache = StatsCache.for_context(ctx)
            acts = {n: unit_activations(spec, pool.load_model(n), ctx.taskpool, tasks,
                                        n_examples=self.params.num_fusion_samples, cache=cache,
                                        model_identity=pool.identity(n)) for n in names}
        reference = states[names[0]]
        aligned = [reference]
        report = {}
        for name in ctx.track(names[1:], desc="optimal transport"):
            moved, report[name] = align(spec, reference, states[name], self.params,
                                        acts.get(names[0]), acts.get(name))
            aligned.append(moved)
        fused = {k: torch.stack([s[k].double() for s in aligned]).mean(0).to(v.dtype) if v.is_floating_point() else v
                 for k, v in reference.items()}
        model = pool.load_model(names[0])
        model.load_state_dict(fused)
        return MergeOutput(model, extras={"reference": names[0], "transport": report})


def _no_points(pool: ModelPool) -> str | None:
    missing = missing_points(pool.permutation_spec())
    if missing:
        return (f"pool {pool.name!r} names no activation point for permutations {missing}; its permutation spec "
                f"needs PermutationSpec.points, or use otfusion.cost=weight with otfusion.importance=uniform")
    return None


@hookimpl
def register_methods(register):
    register(OTFusion)
