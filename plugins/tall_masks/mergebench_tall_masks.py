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
magnitudes ranked over the whole model, combine `ties_combine` = "sum", as the authors' `ties_agg: sum`).
Masks depend only on each tensor's entries, so everything streams tensor by tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mergebench_core import PRETRAINED, MergebenchError, MergeOutput, MergeStream, Method, MethodInfo, ModelPool
from mergebench_core import PerTaskModels, RunContext, TensorMergeMethod, hookimpl
from mergebench_core.merging import merge_sources
from mergebench_core.sparsify import StreamingTopK, keep_count
from mergebench_core.tensors import StateDictSource, TensorSource
from mergebench_ties import elect_and_combine

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


class MultiTaskVector:
    """τ_MTL tensor by tensor: the plain sum, or TIES with a whole-model magnitude threshold found up front."""

    def __init__(self, how: str, ties_k: float, ties_combine: str):
        self.how, self.ties_k, self.ties_combine = how, ties_k, ties_combine
        self._topk: StreamingTopK | None = None

    def prepare(self, stream: MergeStream) -> None:
        if self.how != "ties":
            return
        count = keep_count(self.ties_k, stream.numel())
        self._topk = StreamingTopK([count] * stream.num_experts)
        for _, taus in stream.task_vectors():
            self._topk.observe_high(taus)
        for _, taus in stream.task_vectors():
            self._topk.observe_low(taus)

    def __call__(self, taus: torch.Tensor) -> torch.Tensor:
        """τ_MTL of one tensor; with TIES, tensors must come in the order `prepare` saw them."""
        if self._topk is None:
            return taus.sum(0)
        return elect_and_combine(taus * self._topk.mask(taus), self.ties_combine)


def tall_masks(taus: torch.Tensor, mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """Boolean masks (T, ...): where |τ_t| exceeds λ·|τ_MTL − τ_t|, i.e. where task t's own update dominates."""
    return taus.abs() > lam * (mtl.unsqueeze(0) - taus).abs()


class Consensus(TensorMergeMethod):
    """Task arithmetic (or TIES) restricted to the entries that at least k tasks' TALL masks share."""

    name = "consensus"
    Params = ConsensusParams
    info = MethodInfo(kind="merge", data="none")

    def prepare(self, stream: MergeStream) -> None:
        p = self.params
        self._mtl = MultiTaskVector(p.multitask, p.ties_k, p.ties_combine)
        self._mtl.prepare(stream)
        self._kept = 0
        self._total = stream.numel()

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        mtl = self._mtl(taus)
        keep = tall_masks(taus, mtl, self.params.tall_mask_lambda).sum(0) >= self.params.k
        self._kept += int(keep.sum())
        self.extras["kept_fraction"] = self._kept / max(self._total, 1)
        return base.to(torch.float32) + self.params.scaling_factor * (mtl * keep)


class _TallMaskPass(TensorMergeMethod):
    """One streaming pass that builds every task's tensors; used by `TallMasks`, never registered on its own."""

    name = "tall_masks"
    Params = TallParams

    def prepare(self, stream: MergeStream) -> None:
        p = self.params
        self._mtl = MultiTaskVector(p.multitask, p.ties_k, p.ties_combine)
        self._mtl.prepare(stream)
        self.per_task: list[dict[str, torch.Tensor]] = [{} for _ in range(stream.num_experts)]
        self.kept = [0] * stream.num_experts
        self.total = stream.numel()

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        mtl = self._mtl(taus)
        masks = tall_masks(taus, mtl, self.params.tall_mask_lambda)
        b = base.to(torch.float32)
        for t, mask in enumerate(masks):
            self.per_task[t][key] = (b + mtl * mask).to(base.dtype)
            self.kept[t] += int(mask.sum())
        return base


class TallMasks(Method):
    """One model per task: θ_0 plus the part of the multi-task vector that task's TALL mask selects."""

    name = "tall_masks"
    Params = TallParams
    info = MethodInfo(kind="merge", data="none", task_specific=True, task_vectors=True)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        if not pool.has_pretrained:
            raise MergebenchError("tall_masks needs a pretrained model (task vectors), and this pool has none")
        tasks = [pool.task_of(e) for e in pool.expert_names]
        if len(set(tasks)) != len(tasks):
            raise MergebenchError(f"tall_masks builds one model per task, but several experts share a task: {tasks}")
        tensor_source = getattr(pool, "tensor_source", None)

        def source(name: str) -> TensorSource:
            return tensor_source(name) if tensor_source is not None else StateDictSource(pool.state_dict(name), name)

        shared: dict[str, torch.Tensor] = {}
        work = _TallMaskPass(self.params)
        merge_sources(work, source(PRETRAINED), [source(n) for n in pool.expert_names], sink=shared,
                      seed=ctx.seed, progress=ctx.track)
        models = {}
        for task, tensors in zip(tasks, work.per_task):
            model = pool.load_model(PRETRAINED)
            model.load_state_dict({k: tensors.get(k, v) for k, v in shared.items()})
            models[task] = model
        kept = {task: n / max(work.total, 1) for task, n in zip(tasks, work.kept)}
        log.info("TALL masks keep %s of the entries", {t: round(f, 3) for t, f in kept.items()})
        return MergeOutput(PerTaskModels(models), extras={"mask_density": kept})


@hookimpl
def register_methods(register):
    register(Consensus)
    register(TallMasks)
