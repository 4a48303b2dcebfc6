"""Representation Surgery (Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024), as
FusionBench 0.2.33 runs it (`fusion_bench/method/surgery/clip_layer_wise_adamerging_surgery.py`,
`fusion_bench/models/surgery/surgerymodelwrapper.py`, config `method/surgery/adamerging_surgery.yaml`).

A merged model's output features drift from each expert's: the "representation bias". Surgery keeps the merge and
adds, per task t, a small adapter on the model's output feature z:

    z' = z − U_t ReLU(D_t z),    D_t: width → 16, U_t: 16 → width, no biases,

D_t initialised as `nn.Linear` does (Kaiming-uniform, a = √5, from the run's seeded generator) and U_t at zero, so the
untrained model is the base merge exactly. The adapters are trained at test time, without labels: per task the L1
distance (mean over entries) between the adapted features of the merged model and the features of that task's
expert on the same unlabeled test batch. The adapters of different tasks share no parameter, so one Adam step on
the sum over tasks (the core training loop, `training.loop.train(..., split="test")`) is exactly FusionBench's one
step per task. The result needs the task id at inference: one model per task (`MethodInfo.task_specific`, † in
tables), all sharing the one merged module.

The output feature is what the pool's model returns and its task pool's head reads: the digits encoder's and the
EfficientNet trunk's output vector, a CLIP vision tower's pooled output (`pooler_output`). Batch-norm running
statistics (the EfficientNet pool) are settled on the base merge by `--bn-stats` before the adapters train
(`mean` or `base`; `recompute` is refused, since it would change the features after training). FusionBench's CLIP code
adapts the normalised 512-d projection instead (its task pool holds the projection); ours adapts the 768-d pooled
output before the task pool projects it, which is the same construction one linear map earlier.

It composes with any method that merges one model (`mergebench_core.contract.composition`): `surgery.base=ties`,
`surgery.base=adamerging_lw`. Defaults (FusionBench's config): base layer-wise AdaMerging (its only Surgery config),
1,000 surgery steps (`surgery_steps`), Adam lr 1e-3 (hard-coded there), batch 16 per task, hidden width 16 (the
wrapper's `hidden_dim`). The base runs first with its own defaults, so the default cell includes AdaMerging's
500 steps: sweeps over every method leave it out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergebench_core import MergebenchError, MergeOutput, MethodInfo, ModelPool, PerTaskModels, RunContext, hookimpl
from mergebench_core.contract.api import Batch
from mergebench_core.contract.composition import OnBaseMethod, canonical_spec, with_base_extras
from mergebench_core.engine.roles import declared_roles, model_roles
from mergebench_core.engine.bn_stats import BnStats
from mergebench_core.engine.running_stats import apply_rule, running_stat_keys
from mergebench_core.running.data_needs import require_task_pool
from mergebench_core.training.loop import TrainState, train
from mergebench_core.training.params import TrainingParams
from mergebench_core.upscaling import count_parameters

SLOW = ("1,000 surgery steps after its base (layer-wise AdaMerging's 500 by default) take minutes on the embedded "
        "pool; run it by name (`-m surgery`, or `surgery.steps=100` for a quick look)")


@dataclass
class Params(TrainingParams):
    base: str = "adamerging_lw"
    """The merge the adapters correct (a method spec: `ties`, `task_arithmetic(scaling_factor=0.3)`)."""
    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 16
    hidden: int = 16
    """Width of each adapter's bottleneck (FusionBench's `hidden_dim`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        self.base = canonical_spec(self.base, owner="surgery.base")


def output_feature(out: Any) -> Tensor:
    """The feature a model's output carries for its head: the tensor itself, or a Hugging Face output's pooled one."""
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    raise MergebenchError(f"surgery adapts the model's output feature, and this model returns a "
                          f"{type(out).__name__} with neither a tensor nor a `pooler_output`; choose a pool whose "
                          f"model returns features (digits, effnet, CLIP)")


def with_feature(out: Any, feature: Tensor) -> Any:
    """`out` with its feature replaced (a Hugging Face output keeps its other fields)."""
    if isinstance(out, Tensor):
        return feature
    fields = dict(out.items())
    fields["pooler_output"] = feature
    return type(out)(**fields)


class FeatureAdapter(nn.Module):
    """z ↦ z − U ReLU(D z): one task's bias correction of the merged feature."""

    def __init__(self, width: int, hidden: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        with torch.no_grad():  # nn.Linear's own init (Kaiming-uniform, a = √5), drawn from the run's generator
            bound = 1.0 / math.sqrt(width)
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.up.weight.zero_()

    def forward(self, z: Tensor) -> Tensor:
        return z - self.up(F.relu(self.down(z.to(self.down.weight.dtype)))).to(z.dtype)


class SurgeryModel(nn.Module):
    """The merged module with one task's adapter on its output feature; scored like the module itself."""

    def __init__(self, merged: nn.Module, adapter: FeatureAdapter) -> None:
        super().__init__()
        self.merged = merged
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.merged(*args, **kwargs)
        return with_feature(out, self.adapter(output_feature(out)))


class _Tap(nn.Module):
    """Runs a module and keeps its output feature, so a task pool's own preprocessing feeds it (CLIP normalises
    pixels inside `logits`)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.seen: Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        self.seen = output_feature(out)
        return out


@torch.no_grad()
def features(module: nn.Module, taskpool: Any, task: str, inputs: Tensor) -> Tensor:
    """`module`'s output feature on `inputs`, as the task pool feeds them to it when scoring `task`."""
    tap = _Tap(module)
    taskpool.logits(tap, task, inputs)
    assert tap.seen is not None
    return tap.seen.float()


def l1_to_experts(merged: nn.Module, experts: Mapping[str, nn.Module], taskpool: Any):
    """The surgery loss: Σ_t mean |adapter_t(z_merged) − z_expert_t| on task t's unlabeled batch."""

    def loss(adapters: nn.Module, batches: Mapping[str, Batch], state: TrainState) -> Tensor:
        total = None
        for task, (inputs, _labels) in batches.items():
            target = features(experts[task], taskpool, task, inputs)
            z = features(merged, taskpool, task, inputs)
            term = F.l1_loss(adapters[task](z), target)
            total = term if total is None else total + term
        assert total is not None
        return total

    return loss


class Surgery(OnBaseMethod):
    """Per-task feature adapters, trained by L1 to each expert's features on unlabeled test batches."""

    name = "surgery"
    Params = Params
    info = MethodInfo(kind="merge", data="unlabeled", task_vectors=True, task_specific=True, left_out_of_sweeps=SLOW)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        p = self.params
        taskpool = require_task_pool(self, ctx.taskpool)
        tasks = tuple(ctx.tasks or taskpool.tasks)
        experts_of = {pool.task_of(e): e for e in pool.expert_names}
        missing = [t for t in tasks if t not in experts_of]
        if missing:
            raise MergebenchError(f"surgery trains each task's adapter toward that task's expert, and pool "
                                  f"{pool.name!r} has no expert for task(s) {missing}; select tasks with --tasks")
        spec, base_output = self.run_base(pool, ctx)
        merged = base_output.model
        self._settle_running_stats(merged, pool, ctx)
        merged = merged.to(ctx.device).eval().requires_grad_(False)
        experts = {t: pool.load_model(experts_of[t]).to(ctx.device).eval().requires_grad_(False) for t in tasks}
        probe, _ = next(iter(taskpool.batches(tasks[0], "test", batch_size=2)))
        width = features(merged, taskpool, tasks[0], probe.to(ctx.device)).shape[-1]
        gen = ctx.generator()
        adapters = nn.ModuleDict({t: FeatureAdapter(width, p.hidden, gen) for t in tasks})
        report: dict[str, Any] = {"feature_width": width, "steps": p.steps}
        if p.steps:
            result = train(adapters, taskpool, tasks, l1_to_experts(merged, experts, taskpool), p.train_config(),
                           seed=ctx.seed, device=ctx.device, log_metrics=ctx.log_metrics, progress=ctx.progress,
                           split="test")
            report.update(l1_last=result.final_loss, train_seconds=result.seconds)
        del experts
        merged = merged.cpu()
        adapters = adapters.cpu().eval().requires_grad_(False)
        models = {t: SurgeryModel(merged, adapters[t]) for t in tasks}
        n0 = count_parameters(merged)
        n = n0 + sum(p.numel() for p in adapters.parameters())
        report.update(parameters=n, base_parameters=n0, params_ratio=n / n0)
        return with_base_extras(MergeOutput(PerTaskModels(models), report), base_output, spec)

    def _settle_running_stats(self, merged: nn.Module, pool: ModelPool, ctx: RunContext) -> None:
        """Batch-norm statistics are settled on the base merge before the adapters learn its features (the runner
        cannot reach them inside the per-task models afterwards); a rule that measures them on data would change the
        features the adapters were trained on, so it is refused."""
        roles = model_roles(merged, declared_roles(pool))
        if not running_stat_keys(roles):
            return
        rule = BnStats.parse(ctx.bn_stats)
        if rule.needs_data:
            raise MergebenchError(f"surgery trains its adapters on the base merge's features, so the running "
                                  f"statistics of pool {pool.name!r} are set before it trains; bn_stats={rule} would "
                                  f"measure them afterwards, under the adapters. Use --bn-stats mean or base")
        apply_rule(merged, pool, rule, roles)


@hookimpl
def register_methods(register):
    register(Surgery)
