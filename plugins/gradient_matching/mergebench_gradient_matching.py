"""Uncertainty-based gradient matching (Daheim, Möllenhoff, Ponti, Gurevych & Khan, "Model Merging by
Uncertainty-Based Gradient Matching", ICLR 2024).

With diagonal Hessian estimates H_0 of the pretrained model and H_t of each expert:
    H̄ = α Σ_t s_t H_t + s_0 H_0 + δ₀
    θ = θ_0 + α Σ_t ((s_t H_t + s_0 H_0 + δ₀) / H̄) ⊙ (θ_t − θ_0)
With H_t = 0 this is task arithmetic with λ = α; with H_0 = δ₀ = 0 it is a Fisher-weighted average of the experts.

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

import torch

from mergebench_core import PRETRAINED, MergebenchError, MergeOutput, Method, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.data.statistics import StatsCache, cached_fisher


@dataclass
class Params:
    scaling_factor: float = 1.0
    """α, the scale of every task vector (and of the experts' Hessians in H̄)."""
    scaling_factor_pt: float | None = None
    """s_0, the scale of the pretrained Hessian; None: the mean of the s_t."""
    scaling_factors_ft: list[float] | None = None
    """s_t per expert (in pool order); None: each task's training-set size."""
    delta_0: float = 1e-12
    """δ₀, the prior precision added everywhere (weight decay over data size in theory)."""
    n_examples: int = 256
    """Training examples per task for each Hessian estimate."""
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.delta_0 < 0 or self.n_examples < 1:
            raise ValueError("delta_0 must be non-negative and n_examples positive")


def gradient_matching_merge(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                            h0: Mapping[str, torch.Tensor], hts: Sequence[Mapping[str, torch.Tensor]], *,
                            alpha: float, s0: float, sts: Sequence[float], delta0: float) -> dict[str, torch.Tensor]:
    """The merge formula above for every tensor with Hessians; other float tensors get task arithmetic (H = 0)."""
    merged: dict[str, torch.Tensor] = {}
    for key, b in base.items():
        if not b.is_floating_point():
            merged[key] = b
            continue
        b64 = b.double()
        taus = [e[key].double() - b64 for e in experts]
        if key in h0:
            prior = s0 * h0[key].double() + delta0
            local = [s * ht[key].double() for s, ht in zip(sts, hts)]
            h_bar = alpha * sum(local) + prior
            update = sum(((lt + prior) / h_bar) * tau for lt, tau in zip(local, taus))
        else:
            update = sum(taus)
        merged[key] = (b64 + alpha * update).to(b.dtype)
    return merged


class GradientMatching(Method):
    """Task arithmetic preconditioned by the experts' and the pretrained model's Hessian diagonals."""

    name = "gradient_matching"
    Params = Params
    info = MethodInfo(kind="merge", data="labeled", task_vectors=True)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        if ctx.taskpool is None or not pool.has_pretrained:
            raise MergebenchError("gradient matching needs a task pool and a pool with a pretrained model")
        p, taskpool = self.params, ctx.taskpool
        cache = StatsCache.for_context(ctx)
        experts = pool.expert_names
        tasks = [pool.task_of(e) for e in experts]

        def hessian(name: str, task: str) -> dict[str, torch.Tensor]:
            return cached_fisher(cache, pool, name, taskpool, task, n_examples=p.n_examples, seed=ctx.seed,
                                 labels="sampled", batch_size=p.batch_size, device=ctx.device, progress=ctx.track)

        hts = [hessian(e, t) for e, t in zip(experts, tasks)]
        per_task_h0 = [hessian(PRETRAINED, t) for t in dict.fromkeys(tasks)]
        h0 = {k: torch.stack([h[k] for h in per_task_h0]).mean(0) for k in per_task_h0[0]}
        if p.scaling_factors_ft is not None:
            if len(p.scaling_factors_ft) != len(experts):
                raise MergebenchError(f"scaling_factors_ft has {len(p.scaling_factors_ft)} values for "
                                      f"{len(experts)} experts")
            sts = [float(s) for s in p.scaling_factors_ft]
        else:
            sts = [float(taskpool.num_examples(t, "train") or p.n_examples) for t in tasks]
        s0 = float(p.scaling_factor_pt) if p.scaling_factor_pt is not None else sum(sts) / len(sts)
        merged = gradient_matching_merge(pool.state_dict(PRETRAINED), [pool.state_dict(e) for e in experts], h0,
                                         hts, alpha=p.scaling_factor, s0=s0, sts=sts, delta0=p.delta_0)
        model = pool.load_model(PRETRAINED)
        model.load_state_dict(merged)
        return MergeOutput(model, extras={"scaling_factor_pt": s0, "scaling_factors_ft": dict(zip(experts, sts)),
                                          "stats_cache": {"hits": cache.hits, "misses": cache.misses}})


@hookimpl
def register_methods(register):
    register(GradientMatching)
