"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022).

θ = Σ_t w_t F_t ⊙ θ_t / Σ_t w_t F_t, parameter by parameter, with F_t the diagonal Fisher of expert t on its own
task's training data (from the shared statistics cache, so gradient matching and a λ grid reuse it).

Defaults and where they come from:
- `n_examples` = 256 and `min_fisher` = 1e-6, added to every Fisher entry so that parameters no example moves
  still get the plain average: FusionBench's `num_fisher_examples` and `minimal_fisher_weight`.
- `normalize` = True: each expert's weight w_t is proportional to 1 / ‖F_t‖ (the norm over the whole model), so
  an expert with larger gradients overall does not dominate everywhere; FusionBench's `normalize_fisher_weight`.
  With False every w_t is 1, the paper's definition.
- `labels` = "sampled": labels drawn from each expert's own predictions, a Monte-Carlo estimate of the true Fisher
  the paper defines (FusionBench uses a batch-level approximation of the same expectation). "empirical" uses the
  true labels. "sampled" is also what gradient matching uses, so the two methods share one cached statistic.
Parameters the Fisher does not cover (buffers) are averaged; integer buffers are copied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergebench_core import PRETRAINED, MergebenchError, MergeOutput, Method, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.data.statistics import StatsCache, cached_fisher


@dataclass
class Params:
    n_examples: int = 256
    """Training examples per expert over which squared gradients are averaged."""
    min_fisher: float = 1e-6
    """Added to every Fisher entry before weighting (a floor that keeps the denominator positive)."""
    normalize: bool = True
    """Weight each expert by 1 / ‖F_t‖ over the whole model (FusionBench's default)."""
    labels: str = "sampled"
    """"sampled" (labels drawn from the model's predictions) or "empirical" (the true labels)."""
    batch_size: int = 64
    """Examples per batch while computing the Fisher (vmap bounds its own memory within a batch)."""

    def __post_init__(self) -> None:
        if self.labels not in ("sampled", "empirical"):
            raise ValueError(f"labels must be 'sampled' or 'empirical', got {self.labels!r}")
        if self.n_examples < 1 or self.min_fisher < 0:
            raise ValueError("n_examples must be positive and min_fisher non-negative")


def fisher_merge(states: Sequence[Mapping[str, torch.Tensor]], fishers: Sequence[Mapping[str, torch.Tensor]], *,
                 min_fisher: float = 1e-6, normalize: bool = True) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Fisher-weighted average of `states`; returns it with the per-model weights w_t (summing to 1)."""
    if normalize:
        norms = [float(torch.sqrt(sum((f.double() ** 2).sum() for f in fisher.values()))) for fisher in fishers]
        inverse = [1.0 / (n + min_fisher) for n in norms]
        weights = [v / sum(inverse) for v in inverse]
    else:
        weights = [1.0 / len(states)] * len(states)
    merged: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            merged[key] = ref
            continue
        values = torch.stack([s[key].float() for s in states])
        if key in fishers[0]:
            f = torch.stack([fi[key].float() + min_fisher for fi in fishers])
            w = torch.tensor(weights).view(-1, *([1] * ref.dim()))
            merged[key] = ((w * f * values).sum(0) / (w * f).sum(0)).to(ref.dtype)
        else:
            merged[key] = values.mean(0).to(ref.dtype)
    return merged, weights


class FisherMerging(Method):
    """Average the experts parameter by parameter, each weighted by its diagonal Fisher on its own task."""

    name = "fisher"
    Params = Params
    info = MethodInfo(kind="merge", data="labeled")

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        if ctx.taskpool is None:
            raise MergebenchError("fisher merging needs a task pool for its training data")
        p = self.params
        cache = StatsCache.for_context(ctx)
        experts = pool.expert_names
        fishers = [cached_fisher(cache, pool, e, ctx.taskpool, pool.task_of(e), n_examples=p.n_examples,
                                 seed=ctx.seed, labels=p.labels, batch_size=p.batch_size,  # type: ignore[arg-type]
                                 device=ctx.device, progress=ctx.track) for e in experts]
        merged, weights = fisher_merge([pool.state_dict(e) for e in experts], fishers, min_fisher=p.min_fisher,
                                       normalize=p.normalize)
        model = pool.load_model(PRETRAINED if pool.has_pretrained else experts[0])
        model.load_state_dict(merged)
        return MergeOutput(model, extras={"model_weights": dict(zip(experts, weights)),
                                          "stats_cache": {"hits": cache.hits, "misses": cache.misses}})


@hookimpl
def register_methods(register):
    register(FisherMerging)
