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
every aligned model (the reference code averages the same way), in float64 (`AlignToFirst`'s rule).

Conventions and defaults: the reference is the pool's first model; `importance` = "uniform" [the paper's default];
"activation" uses each unit's mean absolute activation as its mass. Models of one architecture only (equal widths):
the fused model takes the reference's architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mergebench_core import hookimpl
from mergebench_core.fusion.align_to_first import AlignToFirst
from mergebench_core.fusion.alignment import PermutationSpec, apply_transport, unit_vectors
from mergebench_core.fusion.fusion_run import FusionParams
from mergebench_core.fusion.levels import IMPORTANCES, neuron_importance

COSTS = ("weight", "activation")
SOLVERS = ("emd", "sinkhorn")


@dataclass
class Params(FusionParams):
    cost: str = "weight"
    """Ground cost between units: "weight" (incoming weights) or "activation" (activations on train inputs)."""
    solver: str = "emd"
    """"emd" (exact optimal transport) or "sinkhorn" (entropic regularisation)."""
    sinkhorn_reg: float = 0.01
    """Sinkhorn's regularisation, relative to the largest ground cost."""
    importance: str = "uniform"
    """Marginals: "uniform" or "activation" (each unit's mean absolute activation)."""
    choices = {"cost": COSTS, "solver": SOLVERS, "importance": IMPORTANCES}
    above = {"sinkhorn_reg": 0.0}


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


class OTFusion(AlignToFirst):
    """Transport every model onto the first with optimal-transport plans, then average."""

    name = "otfusion"
    Params = Params
    report_key = "transport"
    activation_values = {"cost": ("activation",), "importance": ("activation",)}
    data_free_hint = "otfusion.cost=weight with otfusion.importance=uniform"

    def align(self, spec: PermutationSpec, reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
              acts_ref: Any, acts_other: Any, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], Any]:
        return align(spec, reference, other, self.params, acts_ref, acts_other)


@hookimpl
def register_methods(register):
    register(OTFusion)
