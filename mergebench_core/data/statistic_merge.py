"""Statistic merges: methods that weigh each expert's tensors by a statistic of that expert on its own task's training
data (Fisher merging, RegMean and RegMean++, uncertainty-based gradient matching).

They all open the same way: a task pool to draw the data from, one statistic per expert (from the shared cache, so a
grid over a method's other parameters computes it once), and an answer for tensors the statistic says nothing about.
`StatisticMerge` owns that preamble, and one rule:

    a tensor the statistic is meant to cover but cannot handle (a grouped convolution has no Gram matrix of
    unfolded patches) is averaged, with a warning the first time such a reason occurs in a run and a count in the
    result's `extras['fallback_tensors']`; never silently.

Tensors outside the statistic by the method's own definition (biases and norms under RegMean, buffers under Fisher
merging) are not fallbacks: they follow the method's `rest` rule (the mean unless it says otherwise) uncounted.
Integer tensors, and tensors the method keeps (`kept`), come from the base state (`base_state`: the pretrained model
for methods that need it, else the first expert).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mergebench_core.contract.api import PRETRAINED, MergeOutput, Method, MethodInfo, ModelPool, RunContext, TaskPool
from mergebench_core.contract.checked_params import CheckedParams
from mergebench_core.data.statistics import StatsCache, cached_abs_gradient, cached_fisher, cached_linear_grams
from mergebench_core.engine.averaging import mean_tensor
from mergebench_core.engine.roles import Fallbacks
from mergebench_core.errors import MergebenchError
from mergebench_core.running.data_needs import require_task_pool

FALLBACK_RULE = "mean"
"""How a tensor the statistic cannot handle is merged, and the key it is counted under in `fallback_tensors`."""


@dataclass
class StatisticParams(CheckedParams):
    """The parameters every statistic merge has: how much data each statistic sees, in batches of what size."""

    n_examples: int = 256
    """Training examples per expert (per task) behind each statistic."""
    batch_size: int = 64
    """Examples per batch while a statistic is computed."""
    at_least = {"n_examples": 1, "batch_size": 1}


@dataclass
class StatisticRun:
    """What the steps of one statistic merge share: the pool, the run's context and data, the statistics cache, and
    the fallbacks met so far."""

    method: str
    pool: ModelPool
    ctx: RunContext
    taskpool: TaskPool
    params: StatisticParams
    cache: StatsCache
    fallbacks: Fallbacks

    @classmethod
    def open(cls, method: Method, pool: ModelPool, ctx: RunContext) -> StatisticRun:
        """The run of `method` on `pool`, or a clear error when the pool or the context cannot serve it."""
        method.require_fit(pool)
        taskpool = require_task_pool(method, ctx.taskpool)  # the runner's guarantee; here for the Python API
        return cls(method.name, pool, ctx, taskpool, method.params, StatsCache.for_context(ctx),
                   Fallbacks(method.name))

    @property
    def experts(self) -> list[str]:
        return self.pool.expert_names

    @property
    def tasks(self) -> list[str]:
        """Each expert's task, in expert order."""
        return [self.pool.task_of(e) for e in self.experts]

    @property
    def base_name(self) -> str:
        """The model whose architecture (and kept tensors) the merge takes: the pretrained one, else the first
        expert."""
        return PRETRAINED if self.pool.has_pretrained else self.experts[0]

    def fisher(self, model: str, task: str, labels: str = "sampled") -> dict[str, torch.Tensor]:
        """The cached diagonal Fisher of pool model `model` on `task` (see `statistics.fisher_diagonal`)."""
        return cached_fisher(self.cache, self.pool, model, self.taskpool, task, n_examples=self.params.n_examples,
                             seed=self.ctx.seed, labels=labels, batch_size=self.params.batch_size,  # type: ignore[arg-type]
                             device=self.ctx.device, progress=self.ctx.track)

    def abs_gradients(self, model: str, task: str) -> dict[str, torch.Tensor]:
        """The cached mean absolute per-example gradient of pool model `model` on `task` (see
        `statistics.mean_abs_gradient`)."""
        return cached_abs_gradient(self.cache, self.pool, model, self.taskpool, task,
                                   n_examples=self.params.n_examples, batch_size=self.params.batch_size,
                                   device=self.ctx.device, progress=self.ctx.track)

    def grams(self, model: str, task: str, convolutions: bool = False) -> dict[str, torch.Tensor]:
        """The cached Gram matrices of the linear layers' inputs of pool model `model` on `task` (see
        `statistics.linear_input_grams`)."""
        return cached_linear_grams(self.cache, self.pool, model, self.taskpool, task,
                                   n_examples=self.params.n_examples, batch_size=self.params.batch_size,
                                   device=self.ctx.device, progress=self.ctx.track, convolutions=convolutions)

    def extras(self) -> dict[str, Any]:
        """What the run reports besides the method's own extras: fallbacks, and cache use when the cache was used."""
        out: dict[str, Any] = {}
        if self.fallbacks:
            out["fallback_tensors"] = dict(self.fallbacks.counts)
        if self.cache.hits or self.cache.misses:
            out["stats_cache"] = {"hits": self.cache.hits, "misses": self.cache.misses}
        return out


class StatisticMerge(Method):
    """A merge that weighs the experts by a statistic of each on its own task.

    A subclass gives `statistic` (one expert's, usually `run.fisher` or `run.grams`) and `merge_tensor` (the rule
    for a tensor the statistic covers), and where it needs them: `prepare` (whole-model quantities; returns extras),
    `entry` (which part of a statistic belongs to a tensor), `refused` (tensors the statistic cannot handle),
    `kept`, `base_state` and `rest`. A method whose statistics depend on the merge so far (RegMean++) overrides
    `merge` and still gets the preamble and the fallback rule.
    """

    info: ClassVar[MethodInfo] = MethodInfo(kind="merge", data="labeled")
    covered_extra: ClassVar[str | None] = None
    """When set, the extras key under which the names of the tensors the statistic merged are stored."""

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        run = StatisticRun.open(self, pool, ctx)
        output = self.merge(run)
        output.extras.update(run.extras())
        return output

    def merge(self, run: StatisticRun) -> MergeOutput:
        """Every expert's statistic, then the merge tensor by tensor, loaded into the base model."""
        model = run.pool.load_model(run.base_name)
        stats = [self.statistic(run, model, e, t) for e, t in zip(run.experts, run.tasks)]
        extras = self.prepare(run, model, stats)
        merged, covered = self.merge_states([run.pool.state_dict(e) for e in run.experts], stats,
                                            base=self.base_state(run), refused=self.refused(model),
                                            fallbacks=run.fallbacks)
        model.load_state_dict(merged)
        if self.covered_extra is not None:
            extras[self.covered_extra] = covered
        return MergeOutput(model, extras=extras)

    # -- what a subclass gives ------------------------------------------------------------------------------------

    def statistic(self, run: StatisticRun, model: nn.Module, expert: str, task: str) -> Mapping[str, torch.Tensor]:
        """Expert `expert`'s statistic on `task` (`model` is the base model, to inspect its layers)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement statistic")

    def merge_tensor(self, key: str, tensors: list[torch.Tensor], entries: list[torch.Tensor],
                     base: torch.Tensor | None) -> torch.Tensor:
        """The merged tensor `key` from the experts' `tensors` and their statistics' `entries` for it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement merge_tensor")

    def prepare(self, run: StatisticRun, model: nn.Module, stats: list[Mapping[str, torch.Tensor]]
                ) -> dict[str, Any]:
        """Whole-model quantities the tensor rule needs (per-expert weights); returns extras to store."""
        return {}

    def entry(self, key: str, statistic: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The part of one expert's statistic that belongs to tensor `key`, or None when it covers no such tensor."""
        return statistic.get(key)

    def refused(self, model: nn.Module) -> dict[str, tuple[str, str]]:
        """{tensor: (reason, detail)} for the tensors the statistic is meant to cover but cannot handle; they are
        averaged and counted. `reason` is warned about once per run, `detail` only in that warning."""
        return {}

    def kept(self, key: str) -> bool:
        """Whether tensor `key` is left as the base state holds it (not merged at all)."""
        return False

    def base_state(self, run: StatisticRun) -> Mapping[str, torch.Tensor] | None:
        """The state handed to the tensor rules as `base`, and whose kept and integer tensors the merge takes; None:
        the first expert's tensors are kept and the rules get no base."""
        return None

    def rest(self, key: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        """A floating tensor the statistic does not cover by definition: the mean of the experts' by default."""
        return mean_tensor(tensors).to(tensors[0].dtype)

    # -- the template ---------------------------------------------------------------------------------------------

    def merge_states(self, states: Sequence[Mapping[str, torch.Tensor]],
                     stats: Sequence[Mapping[str, torch.Tensor]], *, base: Mapping[str, torch.Tensor] | None = None,
                     refused: Mapping[str, tuple[str, str]] | None = None, fallbacks: Fallbacks | None = None
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Merge `states` given each one's statistic: returns the merged state and the tensors the statistic merged.

        Per tensor, in the first state's order: integer and `kept` tensors from `base` (else the first state);
        `refused` ones averaged and counted in `fallbacks`; those the statistic covers by `merge_tensor`; the rest
        by `rest`. Needs no pool, so the rules can be tested on hand-built state dicts."""
        if len(states) != len(stats):
            raise MergebenchError(f"{self.name}: {len(states)} experts but {len(stats)} statistics")
        keep = base if base is not None else states[0]
        refused = refused or {}
        fallbacks = fallbacks if fallbacks is not None else Fallbacks(self.name)
        merged: dict[str, torch.Tensor] = {}
        covered: list[str] = []
        for key, ref in states[0].items():
            if not ref.is_floating_point() or self.kept(key):
                merged[key] = keep[key]
                continue
            tensors = [s[key] for s in states]
            entries = [self.entry(key, s) for s in stats]
            b = base.get(key) if base is not None else None
            if key in refused:
                fallbacks.add(key, FALLBACK_RULE, *refused[key])
                merged[key] = mean_tensor(tensors).to(ref.dtype)
            elif all(e is not None for e in entries):
                merged[key] = self.merge_tensor(key, tensors, entries, b)  # type: ignore[arg-type]
                covered.append(key)
            else:
                merged[key] = self.rest(key, tensors, b)
        return merged, covered
