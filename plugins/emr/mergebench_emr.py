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
- Where Σ_t τ_t is exactly zero the elected sign is −1, as in the authors' code ((x > 0)·2 − 1).
- `rescale = "sum"` sums over every entry of the model, as the paper's equation is written. The authors' code
  (and FusionBench's port) instead sums the per-tensor *means*, Σ_k mean|τ_t[k]| / Σ_k mean|M_t[k] ⊙ τ_uni[k]|,
  which weighs small tensors (biases, norms) as much as large ones; choose it with `rescale = "tensor_mean"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergebench_core import PRETRAINED, MergeOutput, Method, MethodInfo, ModelPool, PerTaskModels, RunContext, hookimpl
from mergebench_core.errors import MergebenchError
from mergebench_core.merging import MergeStream
from mergebench_core.tensors import StateDictSource, TensorSource, check_compatible, is_mergeable


@dataclass
class Params:
    rescale: str = "sum"
    """"sum" (the paper's λ_t over all entries) or "tensor_mean" (the authors' code: sum of per-tensor means)."""

    def __post_init__(self) -> None:
        if self.rescale not in ("sum", "tensor_mean"):
            raise ValueError(f"rescale must be 'sum' or 'tensor_mean', got {self.rescale!r}")


def elect_and_mask(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_uni, masks) for stacked task vectors (T, ...): the elected unified vector and each task's agreement."""
    sign = torch.where(taus.sum(0) > 0, 1.0, -1.0).to(taus.dtype)
    masks = taus * sign > 0
    magnitude = (taus.abs() * masks).amax(0)
    return sign * magnitude, masks


@dataclass
class EmrResult:
    """Per-task state dicts (θ_0 + λ_t M_t ⊙ τ_uni, in expert order) and the rescalers λ_t."""

    state_dicts: list[dict[str, torch.Tensor]]
    rescalers: list[float]


def emr_merge_sources(base: TensorSource, experts: Sequence[TensorSource], rescale: str = "sum") -> EmrResult:
    """EMR over tensor sources in two streaming passes: the rescalers first, then the per-task tensors."""
    if not experts:
        raise MergebenchError("nothing to merge: no expert models were given")
    keys = check_compatible([base, *experts])
    float_keys = [k for k in keys if is_mergeable(base.dtype(k))]
    stream = MergeStream(float_keys, base, experts)
    n = len(experts)
    kept = torch.zeros(n, dtype=torch.float64)  # Σ|τ_t|
    modulated = torch.zeros(n, dtype=torch.float64)  # Σ|M_t ⊙ τ_uni|
    for _, taus in stream.task_vectors():
        uni, masks = elect_and_mask(taus)
        per_task = taus.flatten(1).abs().sum(1, dtype=torch.float64)
        per_mod = (masks * uni.abs()).flatten(1).sum(1, dtype=torch.float64)
        if rescale == "tensor_mean":
            per_task, per_mod = per_task / max(uni.numel(), 1), per_mod / max(uni.numel(), 1)
        kept += per_task
        modulated += per_mod
    # a task whose masked vector is all zero gets no update whatever its λ; 0 keeps the number finite
    lambdas = torch.where(modulated > 0, kept / modulated.clamp_min(1e-300), torch.zeros_like(kept))
    out: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    float_set = set(float_keys)
    for key in keys:
        if key not in float_set:  # integer buffers: identical in every model (checked by the engine's rules)
            value = base.get(key)
            for src in experts:
                if not torch.equal(src.get(key), value):
                    raise MergebenchError(f"non-floating tensor {key!r} differs between {base.name} and {src.name}")
            for sd in out:
                sd[key] = value.clone()
            continue
        b, ex = stream.read(key)
        assert b is not None
        taus = torch.stack([e.to(torch.float32) - b.to(torch.float32) for e in ex])
        uni, masks = elect_and_mask(taus)
        for t, sd in enumerate(out):
            sd[key] = (b.to(torch.float32) + float(lambdas[t]) * (masks[t] * uni)).to(b.dtype)
    return EmrResult(out, [float(x) for x in lambdas])


class Emr(Method):
    """One unified task vector, modulated per task by a sign-agreement mask and a magnitude rescaler."""

    name = "emr"
    Params = Params
    info = MethodInfo(kind="merge", data="none", task_specific=True, task_vectors=True)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        if not pool.has_pretrained:
            raise MergebenchError(f"method {self.name!r} needs a pretrained model, and pool {pool.name!r} has none")
        tensor_source = getattr(pool, "tensor_source", None)

        def source(name: str) -> TensorSource:
            return tensor_source(name) if tensor_source is not None else StateDictSource(pool.state_dict(name), name)

        names = pool.expert_names
        result = emr_merge_sources(source(PRETRAINED), [source(n) for n in names], self.params.rescale)
        models = {}
        for name, sd in zip(names, result.state_dicts):
            task = pool.task_of(name)
            if task in models:
                raise MergebenchError(f"experts of pool {pool.name!r} share the task {task!r}; EMR needs one per task")
            model = pool.load_model(PRETRAINED)
            model.load_state_dict(sd)
            models[task] = model
        rescalers = {pool.task_of(n): lam for n, lam in zip(names, result.rescalers)}
        ctx.log.info("emr rescalers: %s", rescalers)
        return MergeOutput(PerTaskModels(models), extras={"rescalers": rescalers})


@hookimpl
def register_methods(register):
    register(Emr)
