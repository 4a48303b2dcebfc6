"""Exact Pareto Optimal (EPO) search: multi-task fine-tuning that ends where r_1 L_1 = r_2 L_2 = ... = r_m L_m.

Mahapatra & Rajan, "Multi-Task Learning with User Preferences: Gradient Descent with Controlled Ascent in Pareto
Optimization", ICML 2020 (arXiv 2108.00597). For a preference r, the "exact Pareto optimal" point is the Pareto
optimum on the ray where the weighted losses r ⊙ L are all equal; unlike a weighted sum it is reachable on any part
of the front, concave parts included.

Each step computes the task losses l and their gradients G (one row per task, over the trainable parameters), then:

- l̂ = r ⊙ l / Σ(r ⊙ l), the weighted losses as a distribution, and its non-uniformity μ_r = KL(l̂ ‖ 1/m);
- C = G Gᵀ, and the adjustment a = r ⊙ (log(m l̂) − μ_r), whose direction Gᵀa moves the losses towards the ray;
- a small linear program chooses β on the simplex, so the step −Gᵀβ (the loop's backward of Σ_j β_j L_j, with β a
  constant) either balances or descends:
  * balance mode (μ_r > eps): maximise βᵀCa subject to (Cβ)_j ≥ 0 for the tasks j* of largest r_j l_j and
    (Cβ)_j ≥ (Ca)_j for the tasks with (Ca)_j ≤ 0, or (Cβ)_j ≥ 0 for every task when no (Ca)_j is positive;
  * descent mode (μ_r ≤ eps): maximise 1ᵀCβ subject to Cβ ≥ 0 (no loss increases to first order) and, unless
    `relax`, βᵀCa ≥ min(max_j (Ca)_j, 0) (the step does not undo the balance).
  These are the constraints of the authors' reference code (`EPO_LP` in github.com/dbmptr/EPOSearch), rewritten here
  for `scipy.optimize.linprog(method="highs")`. The program is solved on C scaled to a largest diagonal entry of 1,
  which changes no constraint and keeps the solver's tolerances meaningful whatever the gradients' scale.
- When the program fails (infeasible, or the solver gives up), β falls back to r / Σr (the linear scalarization step)
  and the fallback is counted, as the authors' training script does.

Defaults: eps = 1e-4 (the authors' `EPO_LP` default, also used in their toy experiments); restricted descent
(`relax = False`, the default of their training code). Their training script multiplies β by m before the step; here
β stays on the simplex (Σβ = 1), so the step has the scale of a uniform linear scalarization's, and `lr` plays the
same role for every preference-aware training method.

Two choices of this implementation, beyond the paper: a preference is normalised to sum 1 first (the program depends
on the scale of r, the ray does not); tasks whose preference is 0 are left out of the program and get β = 0, so a
vertex of the simplex (r = e_k) trains task k alone, the limit of the ray (the authors' code would take log 0 there
and get NaN adjustments).

The counts of balance steps, descent steps and fallbacks, and the last μ_r, are kept in `TrainState.report["epo"]`
(so the cell's extras hold them, under `train.report.epo`) and logged every step as `epo/*`, beside each task's loss
(`loss/train/{task}`) and weight (`epo/beta/{task}`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.training.loop import Batch, TrainState, task_losses
from mergebench_core.training.methods import TrainingMethod
from mergebench_core.training.params import TrainingParams

log = logging.getLogger(__name__)

BALANCE, DESCENT = "balance", "descent"


@dataclass
class Params(TrainingParams):
    eps: float = 1e-4
    """Non-uniformity μ_r = KL(l̂ ‖ 1/m) above which a step balances rather than descends (authors' default)."""
    relax: bool = False
    """Descent mode without the constraint that keeps the balance (the authors' "relaxed" descent)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")


@dataclass(frozen=True)
class EpoStep:
    """What `epo_direction` decided, and on what."""

    mode: str
    """"balance" or "descent": the linear program that was solved (or tried, when `fallback`)."""
    mu: float
    """μ_r = KL(l̂ ‖ 1/m) over the tasks with a positive preference."""
    fallback: bool
    """The program failed and β is r / Σr."""
    message: str = ""
    """The solver's message when it failed."""
    active: tuple[int, ...] = ()
    """Indices of the tasks in the program (positive preference); the others get β = 0."""
    gram: np.ndarray | None = None
    """C = G Gᵀ over the active tasks, scaled to a largest diagonal entry of 1, as the program saw it."""
    adjustment: np.ndarray | None = None
    """a = r ⊙ (log(m l̂) − μ_r) over the active tasks."""


def check_preference(preference: Tensor | Sequence[float], m: int | None = None) -> np.ndarray:
    """The preference as float64 numbers summing to 1; ValueError for an empty, negative, non-finite or all-zero
    vector, or one whose length is not m."""
    r = np.asarray(preference.detach().cpu().numpy() if isinstance(preference, Tensor) else preference,
                   dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("the preference is empty: give one non-negative weight per task")
    if m is not None and r.size != m:
        raise ValueError(f"the preference has {r.size} weights for {m} tasks: give one weight per task")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"the preference {r.tolist()} has a weight that is not a finite number")
    if np.any(r < 0):
        raise ValueError(f"the preference {r.tolist()} has a negative weight; weights must be >= 0")
    if not r.sum() > 0:
        raise ValueError(f"the preference {r.tolist()} is all zeros; at least one weight must be positive")
    return r / r.sum()


def adjustments(losses: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """(r ⊙ l, μ_r = KL(l̂ ‖ 1/m), a = r ⊙ (log(m l̂) − μ_r)) for positive r and non-negative losses."""
    m = len(r)
    rl = r * losses
    total = rl.sum()
    l_hat = rl / total if total > 0 else np.full(m, 1.0 / m)
    tiny = np.finfo(np.float64).tiny
    log_ml = np.log(np.maximum(l_hat, tiny) * m)
    mu = float(np.sum(np.where(l_hat > 0, l_hat * log_ml, 0.0)))
    return rl, mu, r * (log_ml - mu)


def _linear_program(C: np.ndarray, a: np.ndarray, rl: np.ndarray, mode: str, relax: bool
                    ) -> tuple[np.ndarray | None, str]:
    """β on the simplex from the balance or descent program (see the module docstring); (None, why) on failure."""
    from scipy.optimize import linprog

    m = len(a)
    Ca = C @ a
    if mode == BALANCE:
        objective = -Ca  # linprog minimises
        if np.any(Ca > 0):
            rhs = Ca.copy()
            constrained = Ca <= 0
            top = rl == rl.max()
            rhs[top], constrained[top] = 0.0, True
        else:
            rhs, constrained = np.zeros(m), np.ones(m, dtype=bool)
        A_ub, b_ub = -C[constrained], -rhs[constrained]
    else:
        objective = -C.sum(axis=0)
        A_ub, b_ub = -C, np.zeros(m)
        if not relax:
            A_ub = np.vstack([A_ub, -Ca[None, :]])
            b_ub = np.append(b_ub, -min(float(Ca.max()), 0.0))
    try:
        res = linprog(objective, A_ub=A_ub if len(b_ub) else None, b_ub=b_ub if len(b_ub) else None,
                      A_eq=np.ones((1, m)), b_eq=np.ones(1), bounds=[(0.0, None)] * m, method="highs")
    except (ValueError, np.linalg.LinAlgError) as exc:  # e.g. non-finite coefficients
        return None, f"{type(exc).__name__}: {exc}"
    if res.status != 0 or res.x is None or not np.all(np.isfinite(res.x)):
        return None, f"status {res.status}: {res.message}"
    beta = np.clip(res.x, 0.0, None)
    if not beta.sum() > 0:
        return None, "the solution is all zeros"
    return beta / beta.sum(), ""


def epo_direction(losses: Tensor, grads: Tensor, preference: Tensor | Sequence[float], eps: float = 1e-4, *,
                  relax: bool = False) -> tuple[Tensor, EpoStep]:
    """The EPO weights β (m, on the simplex) for one step from the task losses (m), their gradients (m × n) and the
    preference (m, non-negative, not all zero): descending along Σ_j β_j ∇L_j moves the losses towards the
    preference ray r_1 l_1 = ... = r_m l_m and then along the Pareto front. β has the dtype and device of `losses`.
    If the linear program fails, β = r / Σr and `info.fallback` is True."""
    if losses.dim() != 1 or grads.dim() != 2 or grads.shape[0] != losses.shape[0]:
        raise ValueError(f"losses must have shape (m,) and grads (m, n); got {tuple(losses.shape)} and "
                         f"{tuple(grads.shape)}")
    m = losses.shape[0]
    r = check_preference(preference, m)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    l_np = losses.detach().to("cpu", torch.float64).numpy()
    if not np.all(np.isfinite(l_np)) or np.any(l_np < 0):
        raise ValueError(f"EPO needs finite non-negative losses (r ⊙ l is normalised into a distribution); got "
                         f"{l_np.tolist()}")
    active = np.flatnonzero(r > 0)
    beta = np.zeros(m)
    if len(active) == 1:  # one task: nothing to balance, descend on it
        beta[active] = 1.0
        return torch.as_tensor(beta, dtype=losses.dtype, device=losses.device), \
            EpoStep(DESCENT, 0.0, False, active=tuple(active.tolist()))
    r_act = r[active] / r[active].sum()
    rl, mu, a = adjustments(l_np[active], r_act)
    g = grads[torch.as_tensor(active, device=grads.device)] if len(active) < m else grads
    g = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
    C = (g @ g.T).detach().to("cpu", torch.float64).numpy()
    scale = float(np.max(np.diag(C)))
    if scale > 0 and math.isfinite(scale):
        C = C / scale
    mode = BALANCE if mu > eps else DESCENT
    solved, message = _linear_program(C, a, rl, mode, relax)
    if solved is None:
        beta = r.copy()
    else:
        beta[active] = solved
    info = EpoStep(mode, mu, solved is None, message, tuple(active.tolist()), C, a)
    return torch.as_tensor(beta, dtype=losses.dtype, device=losses.device), info


def _flat_grads(losses: Sequence[Tensor], params: Sequence[nn.Parameter]) -> Tensor:
    """One row per loss: its gradient over `params`, flattened (float32 at least); graphs are kept for the step."""
    n = sum(p.numel() for p in params)
    dtype = torch.promote_types(params[0].dtype, torch.float32)
    G = torch.zeros(len(losses), n, dtype=dtype, device=params[0].device)
    for row, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        offset = 0
        for p, g in zip(params, grads):
            if g is not None:
                G[row, offset:offset + p.numel()] = g.reshape(-1)
            offset += p.numel()
    return G


class EPO(TrainingMethod):
    """Multi-task fine-tuning by EPO search towards the cell's preference ray r ⊙ L = const (uniform r without one)."""

    name = "epo"
    Params = Params
    info = MethodInfo(kind="training", data="labeled", task_vectors=True, preference_aware=True)

    def loss(self, model: nn.Module, batches: Mapping[str, Batch], state: TrainState
             ) -> tuple[Tensor, dict[str, float]]:
        losses = task_losses(model, batches, state)
        tasks = list(losses)
        weights = dict(zip(state.tasks, state.task_weights().tolist()))
        r = check_preference([weights[t] for t in tasks], len(tasks))
        stats: dict[str, Any] = state.report.setdefault(
            "epo", {"balance_steps": 0, "descent_steps": 0, "fallbacks": 0, "mu": math.nan})
        active = [i for i in range(len(tasks)) if r[i] > 0]
        trainable = self.trainable(model)
        params = [p for p in (model.parameters() if trainable is None else trainable) if p.requires_grad]
        values = torch.stack([losses[t].detach().float() for t in tasks])
        beta = torch.zeros(len(tasks), dtype=torch.float64)
        if len(active) == 1:
            beta[active[0]], step = 1.0, EpoStep(DESCENT, 0.0, False, active=tuple(active))
        else:
            G = _flat_grads([losses[tasks[i]] for i in active], params)
            sub, step = epo_direction(values[active], G, r[active], self.params.eps, relax=self.params.relax)
            del G
            if step.fallback:
                beta = torch.as_tensor(r, dtype=torch.float64)
            else:
                beta[active] = sub.double().cpu()
        stats["mu"] = step.mu
        stats["balance_steps" if step.mode == BALANCE else "descent_steps"] += 1
        if step.fallback:
            stats["fallbacks"] += 1
            (log.warning if stats["fallbacks"] == 1 else log.debug)(
                "EPO's %s program failed at step %d (%s); this step uses the preference r / Σr as weights",
                step.mode, state.step, step.message)
        total = sum(float(b) * losses[t] for b, t in zip(beta, tasks))
        logged = {f"loss/train/{t}": float(v) for t, v in zip(tasks, values)}
        logged |= {f"epo/beta/{t}": float(b) for t, b in zip(tasks, beta)}
        logged |= {"epo/mu": step.mu, "epo/balance": float(step.mode == BALANCE),
                   **{f"epo/{k}": float(v) for k, v in stats.items() if k != "mu"}}
        return total, logged  # type: ignore[return-value]


@hookimpl
def register_methods(register):
    register(EPO)
