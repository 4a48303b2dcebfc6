"""Checks and scores of a cell's results: a task pool that can score the pool, weights that are finite, and the
means stored with every row (the mean of each task's primary metric, and the normalised mean against the experts)."""

from __future__ import annotations

from typing import Any

import torch

from mergebench_core.contract.api import Ensemble, ModelPool, PerTaskModels, TaskPool
from mergebench_core.data.evaluation import Metrics, primary_value
from mergebench_core.errors import ConfigError, MergebenchError


def check_scores(pool: ModelPool, taskpool: TaskPool) -> None:
    """The task pool must score the pool's experts on their own tasks: a task pool of other tasks (`--taskpool`
    naming another suite) would fail later inside a model with a shape error."""
    if pool.relation != "finetuned":
        return
    missing = [pool.task_of(e) for e in pool.expert_names if pool.task_of(e) not in taskpool.tasks]
    if missing:
        raise ConfigError(f"task pool {taskpool.name!r} cannot score model pool {pool.name!r}: it has no task "
                          f"{', '.join(repr(t) for t in missing)} (its tasks: {', '.join(taskpool.tasks)}). Drop "
                          f"--taskpool to use the pool's own ({pool.default_taskpool}), or name a task pool with "
                          f"these tasks")


class NonFiniteResult(MergebenchError):
    """A method produced NaN or infinite weights; the cell fails instead of storing a meaningless score."""


def check_finite_weights(evaluable: Any) -> None:
    """Refuse a merged model (or ensemble, or per-task models) with a non-finite weight, naming the tensor."""
    if isinstance(evaluable, Ensemble):
        models = dict(enumerate(evaluable.models))
    elif isinstance(evaluable, PerTaskModels):
        models = dict(evaluable.models)
    else:
        models = {"": evaluable}
    for where, model in models.items():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                place = f" (model {where})" if where != "" else ""
                raise NonFiniteResult(f"the method produced non-finite weights: {name}{place} has {bad} NaN or "
                                      f"infinite entries of {tensor.numel()}")


def primary_mean(metrics: Metrics, primary: dict[str, dict[str, Any]]) -> float | None:
    """Mean over tasks of each task's primary metric (accuracy unless the task pool declares another)."""
    values = [v for t in metrics if (v := primary_value(metrics, primary, t)) is not None]
    return sum(values) / len(values) if values else None


def normalized_mean(metrics: Metrics, individual: Metrics, primary: dict[str, dict[str, Any]] | None = None
                    ) -> float | None:
    """Mean over tasks of (merged score / the expert's score on the same task), on each task's primary metric."""
    primary = primary or {}
    ratios = []
    for t in metrics:
        mine, theirs = primary_value(metrics, primary, t), primary_value(individual, primary, t)
        if mine is not None and theirs:
            ratios.append(mine / theirs)
    return sum(ratios) / len(ratios) if ratios else None
