"""Uncertainty-based gradient matching (Daheim, Möllenhoff, Ponti, Gurevych & Khan, "Model Merging by
Uncertainty-Based Gradient Matching", ICLR 2024).

With diagonal Hessian estimates H_0 of the pretrained model and H_t of each expert:
    H̄ = α Σ_t s_t H_t + s_0 H_0 + δ₀
    θ = θ_0 + α Σ_t ((s_t H_t + s_0 H_0 + δ₀) / H̄) ⊙ (θ_t − θ_0)
With H_t = 0 this is task arithmetic with λ = α; with H_0 = δ₀ = 0 it is a Fisher-weighted average of the experts.
Floating tensors with no Hessian (buffers) get task arithmetic, the H = 0 case of the same formula.

Defaults and where they come from (the authors' merging script and README):
- `scaling_factor` α = 1.0 and `delta_0` δ₀ = 1e-12 ("a small value like 1e-12 works well"). δ₀ is in the units
  of the Hessians (squared gradients times s_t), so its effect depends on the model and the data sizes: against
  the embedded pools' Hessians 1e-12 is negligible, as the authors intend. The paper derives δ₀ as a prior precision
  (weight decay over data size), an absolute quantity, so there is no scale-free variant here; to test the
  sensitivity, sweep it (`gradient_matching.delta_0=1e-12,1e-6,1e-3`).
- `scaling_factors_ft` s_t: the README calls them a convenience for turning an average of squared gradients into
  a sum over the training set, and the script passes each task's training-set size; here None means exactly that
  (`taskpool.num_examples(task, "train")`, else `n_examples`).
- `scaling_factor_pt` s_0: the script passes the size of the data behind H_0, of the same order as each task's
  (25,000 against 8,530–180,000). H_0 is the mean of the pretrained model's Hessians over the experts' tasks, and
  None means the mean of the s_t. (The total of the s_t lets H_0 dominate H̄, which turns the merge into task
  arithmetic with λ = α = 1: on the embedded pool that falls below the pretrained model.)
- H estimates: squared per-example gradients with labels sampled from the model's own predictions, on
  `n_examples` = 256 training examples per task (the same cached statistic Fisher merging uses by default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergebench_core import PRETRAINED, MergebenchError, MethodInfo, hookimpl
from mergebench_core.data.statistic_merge import StatisticMerge, StatisticParams, StatisticRun
from mergebench_core.engine.averaging import mean_tensor


@dataclass
class Params(StatisticParams):
    scaling_factor: float = 1.0
    """α, the scale of every task vector (and of the experts' Hessians in H̄)."""
    scaling_factor_pt: float | None = None
    """s_0, the scale of the pretrained Hessian; None: the mean of the s_t."""
    scaling_factors_ft: list[float] | None = None
    """s_t per expert (in pool order); None: each task's training-set size."""
    delta_0: float = 1e-12
    """δ₀, the prior precision added everywhere (weight decay over data size in theory)."""
    at_least = {"delta_0": 0.0}


class GradientMatching(StatisticMerge):
    """Task arithmetic preconditioned by the experts' and the pretrained model's Hessian diagonals."""

    name = "gradient_matching"
    Params = Params
    info = MethodInfo(kind="merge", data="labeled", task_vectors=True)

    def statistic(self, run: StatisticRun, model: nn.Module, expert: str, task: str) -> dict[str, torch.Tensor]:
        return run.fisher(expert, task, "sampled")

    def prepare(self, run: StatisticRun, model: nn.Module, stats: list[Mapping[str, torch.Tensor]]
                ) -> dict[str, Any]:
        p = self.params
        per_task_h0 = [run.fisher(PRETRAINED, t, "sampled") for t in dict.fromkeys(run.tasks)]
        self.h0 = {k: mean_tensor([h[k] for h in per_task_h0]) for k in per_task_h0[0]}
        if p.scaling_factors_ft is not None:
            if len(p.scaling_factors_ft) != len(run.experts):
                raise MergebenchError(f"scaling_factors_ft has {len(p.scaling_factors_ft)} values for "
                                      f"{len(run.experts)} experts")
            self.sts = [float(s) for s in p.scaling_factors_ft]
        else:
            self.sts = [float(run.taskpool.num_examples(t, "train") or p.n_examples) for t in run.tasks]
        self.s0 = float(p.scaling_factor_pt) if p.scaling_factor_pt is not None else sum(self.sts) / len(self.sts)
        return {"scaling_factor_pt": self.s0, "scaling_factors_ft": dict(zip(run.experts, self.sts))}

    def base_state(self, run: StatisticRun) -> dict[str, torch.Tensor]:
        return run.pool.state_dict(PRETRAINED)

    def merge_tensor(self, key: str, tensors: list[torch.Tensor], hts: list[torch.Tensor],
                     base: torch.Tensor | None) -> torch.Tensor:
        assert base is not None
        b64 = base.double()
        prior = self.s0 * self.h0[key].double() + self.params.delta_0
        local = [s * ht.double() for s, ht in zip(self.sts, hts)]
        h_bar = self.params.scaling_factor * sum(local) + prior
        update = sum(((lt + prior) / h_bar) * (e.double() - b64) for lt, e in zip(local, tensors))
        return (b64 + self.params.scaling_factor * update).to(base.dtype)

    def rest(self, key: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        """No Hessian: task arithmetic with λ = α (the formula with H = 0)."""
        assert base is not None
        b64 = base.double()
        return (b64 + self.params.scaling_factor * sum(e.double() - b64 for e in tensors)).to(base.dtype)


def gradient_matching_merge(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                            h0: Mapping[str, torch.Tensor], hts: Sequence[Mapping[str, torch.Tensor]], *,
                            alpha: float, s0: float, sts: Sequence[float], delta0: float) -> dict[str, torch.Tensor]:
    """The merge formula above for every tensor with Hessians; other float tensors get task arithmetic (H = 0)."""
    method = GradientMatching(Params(scaling_factor=alpha, delta_0=delta0))
    method.h0, method.s0, method.sts = dict(h0), float(s0), [float(s) for s in sts]
    return method.merge_states(list(experts), list(hts), base=base)[0]


@hookimpl
def register_methods(register):
    register(GradientMatching)
