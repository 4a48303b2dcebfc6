"""PCB-Merging: parameter competition balancing (Du et al., "Parameter Competition Balancing for Model Merging",
NeurIPS 2024; the authors' release github.com/duguodong7/pcb-merging, `pcb-merging.py`).

Each entry of each task vector gets a balancing score, the product of
- intra-balancing, how much the entry matters inside its own task: exp(T · n_t²), where n_t is |τ_t| clipped to
  its task's [`clip_ratio`, 1 − `clip_ratio`] quantiles and min-max normalised over the whole model (T tasks), and
- inter-balancing, how much it agrees with the other tasks: tanh(τ_t ⊙ Σ_j τ_j).
Per task, scores below the top `ratio` quantile are dropped: the score is clipped from below at that quantile and
min-max normalised, so the weight w_t is 0 there and 1 at the task's best entry. The clipped task vectors are then
averaged with those weights, θ = θ_0 + λ · Σ_t w_t sign(τ_t)|τ_t|_clip / max(Σ_t w_t, 1e-12).

Quantiles follow the authors' code exactly: over the whole flattened model per task, the values at sorted
positions ⌊d·c⌋ and ⌊d·(1 − c) − 1⌋ for the clip, and ⌊d·(1 − ratio)⌋ for the drop (d entries). They are found
with the engine's exact streaming selection (`exact_topk.kth_largest`), so the model is never held whole: two
passes for the clip bounds, two (four if a quantile is negative) for the score quantile, then the merge.

Defaults: `ratio` 0.1 (the default of `PCB_merge` in the release), `clip_ratio` 0.0001 (the same function),
λ = `scaling_factor` 1.2 (the per-task coefficient of the release's vision script, `vision_source_code/pcb.py`,
which multiplies every clipped task vector before the weighted mean; the release's evolutionary search tunes it in
[0.8, 1.3], which mergebench does not run). A min-max normalisation over a constant (every entry equal) divides 0
by 0 in the release; here it gives 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergebench_core import MergeStream, MethodInfo, TaskVectorMethod, hookimpl
from mergebench_core.engine.exact_topk import kth_largest
from mergebench_core.engine.stream import Block
from mergebench_core.engine.task_vector_stages import apply, sum_rows


@dataclass
class Params:
    ratio: float = 0.1
    """Fraction of each task's entries that keep a non-zero weight (by balancing score)."""
    clip_ratio: float = 0.0001
    """Fraction of each task's magnitudes clipped at each end before the intra-balancing normalisation."""
    scaling_factor: float = 1.2
    """λ applied to the balanced mean of the task vectors."""

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if not 0.0 <= self.clip_ratio < 0.5:
            raise ValueError(f"clip_ratio must be in [0, 0.5), got {self.clip_ratio}")
        if not math.isfinite(self.scaling_factor):
            raise ValueError(f"scaling_factor must be a finite number, got {self.scaling_factor}")


def sorted_position_rank(d: int, position: int) -> int:
    """The rank from the top (1 = largest) of the value at ascending sorted `position` of d entries."""
    return d - position


def minmax(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(x − low) / (high − low) per row, 0 where the row is constant."""
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(x))


class Pcb(TaskVectorMethod):
    """Weigh every entry of every task vector by how much it matters to its task and agrees with the others."""

    name = "pcb"
    Params = Params
    info = MethodInfo(kind="merge", data="none")
    blockwise = True

    def prepare(self, stream: MergeStream) -> None:
        p, d, tasks = self.params, stream.numel(), stream.num_experts
        if d == 0:
            self._lo = self._hi = self._q = self._top = torch.zeros(tasks, 1)
            return
        lo_rank = sorted_position_rank(d, int(d * p.clip_ratio))
        hi_rank = sorted_position_rank(d, int(d * (1 - p.clip_ratio) - 1))

        def magnitudes():
            for key in stream.keys:
                for _, _, taus in stream.task_vector_blocks(key, reuse=True):
                    mags = taus.abs()
                    yield torch.cat([mags, mags])

        bounds = kth_largest(magnitudes, [lo_rank] * tasks + [hi_rank] * tasks)
        self._lo = torch.tensor(bounds[:tasks]).view(-1, 1)
        self._hi = torch.tensor(bounds[tasks:]).view(-1, 1)

        def scores():
            for key in stream.keys:
                for _, _, taus in stream.task_vector_blocks(key, reuse=True):
                    score = self.scores(taus)
                    yield torch.cat([score, score])

        q_rank = sorted_position_rank(d, int(d * (1 - p.ratio)))
        cuts = kth_largest(scores, [q_rank] * tasks + [1] * tasks)
        self._q = torch.tensor(cuts[:tasks]).view(-1, 1)
        self._top = torch.tensor(cuts[tasks:]).view(-1, 1)
        self.extras["score_quantile"] = [round(v, 6) for v in cuts[:tasks]]

    def clipped(self, taus: torch.Tensor) -> torch.Tensor:
        """|τ| clipped to each task's clip bounds (T, m)."""
        lo, hi = self._lo.to(taus.device), self._hi.to(taus.device)
        return torch.minimum(torch.maximum(taus.abs(), lo), hi)

    def scores(self, taus: torch.Tensor) -> torch.Tensor:
        """The balancing score of each entry (T, m): intra-balancing times inter-balancing."""
        lo, hi = self._lo.to(taus.device), self._hi.to(taus.device)
        intra = torch.exp(len(taus) * minmax(self.clipped(taus), lo, hi) ** 2)
        inter = torch.tanh(taus * sum_rows(taus))
        return intra * inter

    def merge_block(self, block: Block, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        q, top = self._q.to(taus.device), self._top.to(taus.device)
        weights = minmax(torch.maximum(self.scores(taus), q), q, top)
        signed = torch.sign(taus) * self.clipped(taus)
        merged = sum_rows(signed * weights) / sum_rows(weights).clamp(min=1e-12)
        return apply(base, merged, self.params.scaling_factor)


@hookimpl
def register_methods(register):
    register(Pcb)
