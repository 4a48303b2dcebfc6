"""Level-by-level fusion: build the fused model one level at a time, each level fitted to target neurons made from
every base model's neurons (the neuron-interpolation methods: HF and KF linear fusion, ALF).

The methods differ in how a level's targets are formed (Hungarian pairs, K-means clusters) and how the level is fitted
to them (least squares in closed form, gradient descent). The procedure around that is one, owned here by
`LevelFusion`, with one rule: **a level is fitted on the input the fused model built so far gives it**, never on a
base model's input, so each level corrects what the levels before it changed. In order:

1. refuse pools that cannot be fused level by level, and runs without the task pool's train inputs;
2. collect every base model's output of every level on `num_fusion_samples` train inputs per task (cached);
3. start the fused model as a copy of the pool's first model (the reference);
4. for each level in forward order: capture its input in the fused model so far, weigh every base model's neurons by
   their importance (`importance`: "uniform", or "activation", the mean absolute activation), and hand the step to
   the method's `fit_level`, which changes the fused level in place and returns what to report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mergebench_core.contract.api import MergeOutput, Method, MethodInfo, ModelPool, RunContext
from mergebench_core.data.statistics import StatsCache
from mergebench_core.fusion.alignment import Level, collect_activations
from mergebench_core.fusion.fusion_run import FusionParams, open_fusion
from mergebench_core.fusion.levels import IMPORTANCES, cannot_fuse, capture_level, neuron_importance


@dataclass
class LevelFusionParams(FusionParams):
    """The parameters every level fusion has: the fusion samples, and how base models' neurons are weighed."""

    importance: str = "uniform"
    """Neuron importance: "uniform" or "activation" (mean absolute activation)."""
    choices = {"importance": IMPORTANCES}


@dataclass
class LevelStep:
    """One level of the fusion, as `fit_level` gets it."""

    index: int
    level: Level
    last: bool
    """The output level (its units are classes: they keep their order)."""
    module: nn.Module
    """The fused model's level, to be changed in place."""
    inputs: torch.Tensor
    """The level's input in the fused model so far, on the fusion samples (its own shape)."""
    acts: list[torch.Tensor]
    """Every base model's output of the level, (rows, units), in pool order."""
    importance: list[torch.Tensor]
    """Every base model's neuron weights, (units,) with mean 1."""
    axis: int
    """The axis of the level's output that holds its units."""
    n_examples: int
    """Fusion samples over all tasks."""
    ctx: RunContext


class LevelFusion(Method):
    """Fuse the pool's models level by level; a subclass gives `fit_level` (and `start`, for checks that need the
    pool's levels)."""

    info: ClassVar[MethodInfo] = MethodInfo(kind="fusion", data="unlabeled")

    @classmethod
    def refusal(cls, pool: ModelPool, params: Any) -> str | None:
        return cannot_fuse(pool, levels=True) or super().refusal(pool, params)

    def start(self, levels: list[str], ctx: RunContext) -> None:
        """Settings and checks that depend on the pool's levels (names in forward order), before any model loads."""

    def fit_level(self, step: LevelStep) -> dict[str, Any]:
        """Fit `step.module` (in place) to targets made from `step.acts`; returns the level's report."""
        raise NotImplementedError(f"{type(self).__name__} does not implement fit_level")

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        start = open_fusion(self, pool, ctx, needs_data=True)
        assert start.taskpool is not None
        spec, names, taskpool, tasks = start.spec, start.names, start.taskpool, start.tasks
        levels = [lv.module for lv in spec.levels]
        self.start(levels, ctx)
        n = self.params.num_fusion_samples
        cache = StatsCache.for_context(ctx)
        models = [pool.load_model(name) for name in names]
        for m in models:
            spec.validate_model(m)
        outputs = [collect_activations(m, taskpool, tasks, levels, n_examples=n, cache=cache,
                                       model_identity=pool.identity(name), feature_axes=spec.feature_axes)
                   for m, name in zip(models, names)]
        fused = pool.load_model(names[0])
        report: dict[str, Any] = {}
        for i, level in enumerate(ctx.track(spec.levels, desc=f"{self.name} levels")):
            inputs, _ = capture_level(fused, level.module, taskpool, tasks, n_examples=n)
            acts = [out[level.module] for out in outputs]
            importance = [neuron_importance(a, self.params.importance) for a in acts]
            step = LevelStep(i, level, i == len(levels) - 1, fused.get_submodule(level.module), inputs, acts,
                             importance, spec.feature_axis(level.module), n * len(tasks), ctx)
            report[level.module] = self.fit_level(step)
        return MergeOutput(fused.eval(), extras={"reference": names[0], "levels": report, "num_fusion_samples": n})
