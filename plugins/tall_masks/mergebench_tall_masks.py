"""TALL masks and Consensus Merging (Wang et al., "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024).

Both start from a multi-task vector τ_MTL (the sum of the task vectors, or their TIES merge) and a per-task mask
that marks the entries where task t's own update dominates what the other tasks add:
  m_t = |τ_t| > λ_t · |τ_MTL − τ_t|        (elementwise; strict, as in the authors' code)
- `tall_masks` (task-specific): task t is scored with θ_t = θ_0 + m_t ⊙ τ_MTL, one model per task. The paper picks
  λ_t per task from {0.2, …, 0.6} on validation data; data-free, we use one fixed `tall_mask_lambda` = 0.6
  (FusionBench's `config/method/tall_mask/task_arithmetic.yaml`).
- `consensus`: keep the entries that at least `k` = 2 masks mark (the authors' `prun_thre_k: 2`, which drops both
  "catastrophic" entries no task needs and "selfish" entries only one task needs), then
  θ = θ_0 + λ · (keep ⊙ τ_MTL). λ = `scaling_factor` = 0.3, the task arithmetic default of this benchmark (the
  paper tunes it on validation like task arithmetic's). k = 0 gives back task arithmetic (or TIES); k above the
  number of tasks gives the pretrained model.

`multitask`: "sum" (task arithmetic, the authors' default `use_ties: false`) or "ties" (TIES with `ties_k` = 0.2,
magnitudes ranked over the whole model, combine `ties_combine` = "sum", as the authors' `ties_agg: sum`; TIES's sign
rule is the core pipeline's, a zero sum elects +). τ_MTL comes from the core's task-vector pipeline
(`mergebench_core.engine.pipeline`) and the masks depend only on each entry's values, so both methods stream in blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mergebench_core import MergeOutput, MergeStream, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.engine.pipeline import Pipeline, TaskVectorPipelineMethod

log = logging.getLogger(__name__)


def _check_multitask(multitask: str, ties_k: float, ties_combine: str, tall_mask_lambda: float) -> None:
    if multitask not in ("sum", "ties"):
        raise ValueError(f"multitask must be 'sum' (task arithmetic) or 'ties', got {multitask!r}")
    if not 0.0 <= ties_k <= 1.0:
        raise ValueError(f"ties_k must be a fraction in [0, 1], got {ties_k}")
    if ties_combine not in ("sum", "mean"):
        raise ValueError(f"ties_combine must be 'sum' or 'mean', got {ties_combine!r}")
    if tall_mask_lambda < 0:
        raise ValueError(f"tall_mask_lambda must be non-negative, got {tall_mask_lambda}")


@dataclass
class ConsensusParams:
    k: int = 2
    """Keep an entry when at least k task masks mark it."""
    tall_mask_lambda: float = 0.6
    """λ_t of the task masks |τ_t| > λ_t·|τ_MTL − τ_t| (the same for every task)."""
    scaling_factor: float = 0.3
    """λ applied to the masked multi-task vector."""
    multitask: str = "sum"
    """How τ_MTL is formed: "sum" (task arithmetic) or "ties"."""
    ties_k: float = 0.2
    """With multitask=ties: fraction of each task vector kept by magnitude (over the whole model)."""
    ties_combine: str = "sum"
    """With multitask=ties: "sum" or "mean" of the entries that agree with the elected sign."""

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"k (the number of agreeing task masks) must be >= 0, got {self.k}")
        _check_multitask(self.multitask, self.ties_k, self.ties_combine, self.tall_mask_lambda)


@dataclass
class TallParams:
    tall_mask_lambda: float = 0.6
    """λ_t of the task masks |τ_t| > λ_t·|τ_MTL − τ_t| (the same for every task)."""
    multitask: str = "sum"
    """How τ_MTL is formed: "sum" (task arithmetic) or "ties"."""
    ties_k: float = 0.2
    """With multitask=ties: fraction of each task vector kept by magnitude (over the whole model)."""
    ties_combine: str = "sum"
    """With multitask=ties: "sum" or "mean" of the entries that agree with the elected sign."""

    def __post_init__(self) -> None:
        _check_multitask(self.multitask, self.ties_k, self.ties_combine, self.tall_mask_lambda)


def multitask_pipeline(how: str, keep: float, combine_how: str) -> Pipeline:
    """The pipeline that forms τ_MTL: the plain sum, or TIES over the whole model (`keep` and `combine_how` are the
    user's `ties_k` and `ties_combine`)."""
    if how == "ties":
        return Pipeline(keep=keep, scope="global", elect=True, combine=combine_how)
    return Pipeline()


def tall_masks(taus: torch.Tensor, mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """Boolean masks (T, ...): where |τ_t| exceeds λ·|τ_MTL − τ_t|, i.e. where task t's own update dominates."""
    return taus.abs() > lam * (mtl.unsqueeze(0) - taus).abs()


class Consensus(TaskVectorPipelineMethod):
    """Task arithmetic (or TIES) restricted to the entries that at least k tasks' TALL masks share."""

    name = "consensus"
    Params = ConsensusParams
    info = MethodInfo(kind="merge", data="none")

    def pipeline(self) -> Pipeline:
        p = self.params
        return multitask_pipeline(p.multitask, p.ties_k, p.ties_combine)

    def prepare(self, stream: MergeStream) -> None:
        super().prepare(stream)
        self.extras.pop("kept_per_task", None)
        self._kept, self._total = 0, stream.numel()

    def output(self, key: str, base: torch.Tensor, taus: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
        keep = tall_masks(taus, merged, self.params.tall_mask_lambda).sum(0) >= self.params.k
        self._kept += int(keep.sum())
        self.extras["kept_fraction"] = self._kept / max(self._total, 1)
        return base.to(torch.float32) + self.params.scaling_factor * (merged * keep)


class TallMasks(TaskVectorPipelineMethod):
    """One model per task: θ_0 plus the part of the multi-task vector that task's TALL mask selects."""

    name = "tall_masks"
    Params = TallParams
    info = MethodInfo(kind="merge", data="none", task_specific=True, task_vectors=True)

    def pipeline(self) -> Pipeline:
        p = self.params
        return multitask_pipeline(p.multitask, p.ties_k, p.ties_combine)

    def prepare(self, stream: MergeStream) -> None:
        super().prepare(stream)
        self.extras.pop("kept_per_task", None)
        self._kept = torch.zeros(stream.num_experts, dtype=torch.int64)
        self._total = stream.numel()

    def output(self, key: str, base: torch.Tensor, taus: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
        masks = tall_masks(taus, merged, self.params.tall_mask_lambda)
        self._kept += masks.sum(1).cpu()
        self.extras["mask_density"] = [int(n) / max(self._total, 1) for n in self._kept]
        return base.to(torch.float32) + merged * masks

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        output = super().run(pool, ctx)
        kept = {pool.task_of(n): f for n, f in zip(pool.expert_names, output.extras["mask_density"])}
        log.info("TALL masks keep %s of the entries", {t: round(f, 3) for t, f in kept.items()})
        return MergeOutput(output.model, extras={"mask_density": kept})


@hookimpl
def register_methods(register):
    register(Consensus)
    register(TallMasks)
