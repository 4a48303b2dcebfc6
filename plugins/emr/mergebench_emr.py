"""EMR-Merging: Elect, Mask & Rescale (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging",
NeurIPS 2024).

EMR keeps one shared (unified) task vector plus, per task, a binary mask and one scalar, and scores each task with
its own lightly modulated model; the artefact is task-specific, so results are marked as such in tables.

- Elect: γ = sign(Σ_t τ_t) per entry; τ_uni takes, per entry, the largest |τ_t| among the tasks whose sign agrees
  with γ, with sign γ.
- Mask: M_t = (τ_t ⊙ γ > 0), the entries where task t agrees with the elected sign.
- Rescale: λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|, so the modulated vector has task t's total magnitude.
- The model for task t is θ_0 + λ_t · M_t ⊙ τ_uni. No hyper-parameter is tuned.

Conventions:
- Every floating-point tensor takes part (the authors' code merges the whole state dict).
- Where Σ_t τ_t is exactly zero the elected sign is +, the core pipeline's one rule (`mergebench_core.engine.pipeline`;
  the authors' code elects −1 there, (x > 0)·2 − 1; the two differ only where task vectors cancel exactly).
- Elect and the unified vector are the core pipeline's election and "max" combination, so EMR streams in blocks
  like every pipeline method: one pass for the rescalers, one to write the per-task models.
- `rescale = "sum"` sums over every entry of the model, as the paper's equation is written. The authors' code
  (and FusionBench's port) instead sums the per-tensor *means*, Σ_k mean|τ_t[k]| / Σ_k mean|M_t[k] ⊙ τ_uni[k]|,
  which weighs small tensors (biases, norms) as much as large ones; choose it with `rescale = "tensor_mean"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergebench_core import MergeOutput, MergeStream, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.engine.data_free import merge_sources
from mergebench_core.engine.pipeline import Pipeline, TaskVectorPipelineMethod
from mergebench_core.engine.sources import TensorSource
from mergebench_core.engine.task_vector_stages import combine


@dataclass
class Params:
    rescale: str = "sum"
    """"sum" (the paper's λ_t over all entries) or "tensor_mean" (the authors' code: sum of per-tensor means)."""

    def __post_init__(self) -> None:
        if self.rescale not in ("sum", "tensor_mean"):
            raise ValueError(f"rescale must be 'sum' or 'tensor_mean', got {self.rescale!r}")


def elect_and_mask(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_uni, masks) for stacked task vectors (T, ...): the elected unified vector and each task's agreement."""
    flat = taus.reshape(len(taus), -1)
    uni = combine(flat, EMR_PIPELINE)
    return uni.view(taus.shape[1:]), (flat * uni > 0).view(taus.shape)


EMR_PIPELINE = Pipeline(elect=True, combine="max")
"""Elect (the sign of Σ τ, + on a zero sum), then per entry the largest agreeing magnitude: τ_uni."""


@dataclass
class EmrResult:
    """Per-task state dicts (θ_0 + λ_t M_t ⊙ τ_uni, in expert order) and the rescalers λ_t."""

    state_dicts: list[dict[str, torch.Tensor]]
    rescalers: list[float]


class Emr(TaskVectorPipelineMethod):
    """One unified task vector, modulated per task by a sign-agreement mask and a magnitude rescaler."""

    name = "emr"
    Params = Params
    info = MethodInfo(kind="merge", data="none", task_specific=True, task_vectors=True)

    def pipeline(self) -> Pipeline:
        return EMR_PIPELINE

    def prepare(self, stream: MergeStream) -> None:
        """The rescalers need the whole model: one pass that sums |τ_t| and |M_t ⊙ τ_uni| per task."""
        super().prepare(stream)
        n = stream.num_experts
        kept = torch.zeros(n, dtype=torch.float64)  # Σ|τ_t|
        modulated = torch.zeros(n, dtype=torch.float64)  # Σ|M_t ⊙ τ_uni|
        for block, _, taus, uni in self.merged_blocks(stream):
            per_task = taus.abs().sum(1, dtype=torch.float64).cpu()
            per_mod = ((taus * uni > 0) * uni.abs()).sum(1, dtype=torch.float64).cpu()
            if self.params.rescale == "tensor_mean":
                size = max(torch.Size(block.shape).numel(), 1)
                per_task, per_mod = per_task / size, per_mod / size
            kept += per_task
            modulated += per_mod
        # a task whose masked vector is all zero gets no update whatever its λ; 0 keeps the number finite
        self.lambdas = torch.where(modulated > 0, kept / modulated.clamp_min(1e-300), torch.zeros_like(kept))
        self.extras["rescalers"] = [float(x) for x in self.lambdas]
        self._scales: dict[torch.device, torch.Tensor] = {}

    def output(self, key: str, base: torch.Tensor, taus: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
        scales = self._scales.get(taus.device)
        if scales is None:
            scales = self._scales[taus.device] = self.lambdas.to(taus.device, torch.float32).view(-1, 1)
        return base.to(torch.float32) + scales * ((taus * merged > 0) * merged)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        output = super().run(pool, ctx)
        rescalers = {pool.task_of(n): lam for n, lam in zip(pool.expert_names, output.extras["rescalers"])}
        ctx.log.info("emr rescalers: %s", rescalers)
        return MergeOutput(output.model, extras={"rescalers": rescalers})


def emr_merge_sources(base: TensorSource, experts: Sequence[TensorSource], rescale: str = "sum") -> EmrResult:
    """EMR over tensor sources in two streaming passes: the rescalers first, then the per-task tensors."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    method = Emr(Params(rescale=rescale))
    merge_sources(method, base, experts, sink=out)
    return EmrResult(out, method.extras["rescalers"])


@hookimpl
def register_methods(register):
    register(Emr)
