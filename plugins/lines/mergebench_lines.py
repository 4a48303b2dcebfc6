"""LiNeS: layer-increasing network scaling of a merged task vector (Wang, Dimitriadis et al., "LiNeS: Post-training
Layer Scaling Prevents Forgetting and Enhances Model Merging", ICLR 2025; the authors' code
github.com/wang-kee/LiNeS, `src/eval/eval.py` and `src/eval/aggregation.py`).

Shallow layers hold general features that every task shares; deep layers hold what is task-specific. LiNeS keeps
the shallow part of a merged task vector small and lets the scale grow with depth. With τ_m = θ_merged − θ_0 the
base method's merged task vector (a method spec: `lines.base=ties`), layer l of L gets

    θ = θ_0 + (α + β · l / (L − 1)) · τ_m,

and every tensor outside the numbered layers (embeddings, the final norm) gets α. Depths come from the core
(`mergebench_core.engine.layers`): numbered blocks, or each module of a model without them.

α as the paper states for multi-task merging: α = (‖Σ_t τ_t‖₁ / ‖τ_m‖₁) / T, so that α·τ_m has the L1 norm of the
task vectors' average (for task arithmetic, α·τ_m is exactly the average whatever its λ). β is tuned as the paper
does: over {0.1, 0.2, …, 1.0} (`np.linspace(0, 1, 11)[1:]` of the authors' code, `beta_points` 10), choosing the
β with the best average normalised accuracy on the validation split (each task's accuracy over its expert's, both
on "val"; ties keep the smaller β). Setting `beta` skips the search; setting `alpha` replaces the rule.

Defaults: `base` task_arithmetic (the paper's first baseline; λ 0.3 as mergebench's task arithmetic), `beta` tuned.
The digits pool's encoder has no numbered blocks, so its layers are fc1, fc2, fc3 and the final norm (L = 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mergebench_core import PRETRAINED, MergeOutput, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.contract.composition import OnBaseMethod, canonical_spec, with_base_extras
from mergebench_core.data.evaluation import evaluate, primary_metrics, primary_value
from mergebench_core.engine.layers import LayerDepths, layer_depths
from mergebench_core.engine.pool_sources import pool_source
from mergebench_core.errors import MergebenchError


@dataclass
class Params:
    base: str = "task_arithmetic"
    """The method whose merged task vector is scaled (a method spec: `ties`, `ties(k=0.1)`)."""
    beta: float | None = None
    """The scale added at the deepest layer over the shallowest; None tunes it on the validation split."""
    beta_points: int = 10
    """The search grid when `beta` is None: β ∈ {1/n, 2/n, …, 1} for n = `beta_points`."""
    alpha: float | None = None
    """The scale of the shallowest layer; None is the paper's rule (‖Σ τ_t‖₁ / ‖τ_m‖₁) / T."""

    def __post_init__(self) -> None:
        for name in ("beta", "alpha"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number or null (tuned / the paper's rule), got {value}")
        if self.beta_points < 1:
            raise ValueError(f"beta_points must be at least 1, got {self.beta_points}")
        self.base = canonical_spec(self.base, owner="lines.base")


def paper_alpha(summed_l1: float, merged_l1: float, tasks: int) -> float:
    """(‖Σ_t τ_t‖₁ / ‖τ_m‖₁) / T: α·τ_m then has the L1 norm of the average task vector."""
    if merged_l1 == 0.0:
        raise MergebenchError("lines: the base method's merged model equals the pretrained one (its task vector "
                              "is zero), so there is nothing to scale; choose another base or set lines.alpha")
    return summed_l1 / merged_l1 / tasks


def layer_scales(depths: LayerDepths, alpha: float, beta: float) -> dict[str, float]:
    """α + β · l/(L − 1) for each tensor in a layer, α outside."""
    scales = {}
    for key in depths.depth:
        fraction = depths.fraction(key)
        scales[key] = alpha if fraction is None else alpha + beta * fraction
    return scales


class Lines(OnBaseMethod):
    """Scale a merged task vector up with depth: shallow layers near the pretrained model, deep layers merged."""

    name = "lines"
    Params = Params
    info = MethodInfo(kind="merge", data="labeled", task_vectors=True)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        spec, base_output = self.run_base(pool, ctx)
        model = base_output.model
        base = pool_source(pool, PRETRAINED)
        experts = [pool_source(pool, name) for name in pool.expert_names]
        params = dict(model.named_parameters())
        theta0 = {k: base.get(k).to(torch.float32) for k in params}
        merged = {k: p.detach().to(torch.float32) - theta0[k] for k, p in params.items()}
        summed_l1 = 0.0
        for key in params:
            summed_l1 += float(sum(e.get(key).to(torch.float32) - theta0[key] for e in experts).abs().sum())
        merged_l1 = float(sum(t.abs().sum() for t in merged.values()))
        alpha = self.params.alpha
        if alpha is None:
            alpha = paper_alpha(summed_l1, merged_l1, len(experts))
        depths = layer_depths(list(params))
        extras = {"alpha": alpha, "layers": depths.count}

        def scaled(beta: float) -> nn.Module:
            scales = layer_scales(depths, alpha, beta)
            with torch.no_grad():
                for key, p in params.items():
                    p.copy_(theta0[key] + scales[key] * merged[key])
            return model

        beta = self.params.beta
        if beta is None:
            beta, extras["val_scores"] = self.tune(pool, ctx, scaled)
        extras["beta"] = beta
        scaled(beta)
        return with_base_extras(MergeOutput(model, extras), base_output, spec)

    def tune(self, pool: ModelPool, ctx: RunContext, scaled) -> tuple[float, dict[str, float]]:
        """The β of the grid with the best average normalised accuracy on the validation split."""
        if ctx.taskpool is None:
            raise MergebenchError("lines tunes β on the validation split and needs a task pool (or set lines.beta)")
        tasks = [pool.task_of(n) for n in pool.expert_names]
        primary = primary_metrics(ctx.taskpool, tasks)

        def scores(model: nn.Module, on: list[str]) -> dict[str, float]:
            metrics = evaluate(ctx.taskpool, model, tasks=on, split="val", device=ctx.device)
            return {t: float(primary_value(metrics, primary, t) or 0.0) for t in on}

        own = {}
        for name, task in zip(pool.expert_names, tasks):
            own.update(scores(pool.load_model(name), [task]))
        n = self.params.beta_points
        grid = [round((i + 1) / n, 10) for i in range(n)]
        results: dict[str, float] = {}
        best, best_score = grid[0], -math.inf
        for beta in ctx.track(grid, desc="tuning β (lines)"):
            got = scores(scaled(beta), tasks)
            score = sum(got[t] / own[t] if own[t] > 0 else 0.0 for t in tasks) / len(tasks)
            results[f"{beta:g}"] = score
            if score > best_score:
                best, best_score = beta, score
        return best, results


@hookimpl
def register_methods(register):
    register(Lines)
