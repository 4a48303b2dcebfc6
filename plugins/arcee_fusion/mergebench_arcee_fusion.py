"""Arcee Fusion (Arcee AI, MergeKit 0.1.5's `arcee_fusion`): update a base model with one expert, but only where
the update matters.

Per tensor, with Δ = θ_1 − θ_0: each row's importance is the KL divergence KL(softmax(θ_1) ‖ softmax(θ_0)) along the
last axis (1e-8 added to both distributions), and each entry's importance is |Δ| times its row's. The threshold is
the median + 1.5 × the interquartile range of the importances (Tukey's upper fence: the outliers), quantiles read as
the sorted values at index ⌊q·(n − 1)⌋; θ = θ_0 + Δ ⊙ [importance ≥ threshold]. Tensors of more than 10^6 entries
take their quantiles from 10^6 entries drawn with replacement, seeded per tensor (MergeKit draws them unseeded).

It fuses exactly one expert into the base: on a pool with more, name it with `arcee_fusion.model=NAME` (the grid
over every method skips it there). No parameters beyond that; the method has no published defaults to choose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergebench_core import MergebenchError, MergeStream, MethodInfo, ModelPool, TensorMergeMethod, hookimpl

SAMPLE = 1_000_000
"""Tensors larger than this take their quantiles from this many sampled entries (MergeKit's bound)."""


@dataclass
class Params:
    model: str | None = None
    """The expert fused into the base; None uses the pool's only expert."""


def importance(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|Δ| times the KL divergence of the expert's softmax from the base's, row by row along the last axis."""
    p = torch.softmax(expert, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    return (expert - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)


def upper_fence(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """median + 1.5 · (q3 − q1) of the scores, each quantile the sorted value at ⌊q·(n − 1)⌋."""
    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=generator).to(flat.device)]
    ordered = torch.sort(flat).values
    index = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[index.to(ordered.device)]
    return median + 1.5 * (q3 - q1)


class ArceeFusion(TensorMergeMethod):
    """The base model plus the entries of one expert's update whose importance is an outlier."""

    name = "arcee_fusion"
    Params = Params
    info = MethodInfo(kind="merge", data="none")

    @classmethod
    def refusal(cls, pool: ModelPool, params: Params) -> str | None:
        return _wrong_choice(params.model, pool.expert_names) or super().refusal(pool, params)

    def select_experts(self, names: Sequence[str]) -> list[str]:
        wrong = _wrong_choice(self.params.model, names)
        if wrong:
            raise MergebenchError(wrong)
        self.chosen = self.params.model or names[0]
        return [self.chosen]

    def prepare(self, stream: MergeStream) -> None:
        if stream.num_experts != 1:
            raise MergebenchError(f"arcee_fusion fuses one model into the base, but {stream.num_experts} were given; "
                                  f"name one with arcee_fusion.model=NAME")
        if getattr(self, "chosen", None):
            self.extras["model"] = self.chosen

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        if base is None:
            raise MergebenchError("arcee_fusion updates a base model: give one (base_model in a MergeKit config)")
        b, e = base.to(torch.float32), experts[0].to(torch.float32)
        scores = importance(e, b)
        keep = (scores >= upper_fence(scores, self.generator(key))).to(torch.float32)
        return b + (e - b) * keep


def _wrong_choice(chosen: str | None, names: Sequence[str]) -> str | None:
    if chosen is None:
        if len(names) != 1:
            return (f"arcee_fusion fuses one expert into the base, but {len(names)} were given: {', '.join(names)}. "
                    f"Name one with arcee_fusion.model=NAME")
        return None
    if chosen not in names:
        return f"arcee_fusion.model names {chosen!r}, which is not among the models: {', '.join(names)}"
    return None


@hookimpl
def register_methods(register):
    register(ArceeFusion)
