"""The one evaluation loop: accuracy and loss of a model (or ensemble, or per-task models) on a task pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core.contract.api import Ensemble, Evaluable, PerTaskModels, TaskPool
from mergebench_core.errors import MergebenchError

Metrics = dict[str, dict[str, float]]


class NonFiniteOutput(MergebenchError):
    """A model whose outputs are NaN or infinite has no meaningful score."""


@runtime_checkable
class ScoresModels(Protocol):
    """A task pool that scores a model itself, through an outside harness with its own requests, metrics and
    standard errors (lm-evaluation-harness), instead of handing out batches for the loop below: `evaluate` hands
    it the whole evaluable. Its metrics are stored as it names them; each task's first `metrics` spec is still the
    primary one."""

    def score_model(self, evaluable: Evaluable, *, tasks: Sequence[str], limit: int | None, device: torch.device,
                    batch_size: int, split: str) -> Metrics: ...


def _prepare(model: nn.Module, device: torch.device) -> nn.Module:
    return model.to(device).eval()


def task_logits(taskpool: TaskPool, model: nn.Module | Ensemble, task: str, inputs: torch.Tensor) -> torch.Tensor:
    """Logits of a single model, or the weighted mean of an ensemble's logits."""
    if isinstance(model, Ensemble):
        weights = list(model.weights) if model.weights is not None else [1.0] * len(model.models)
        total = float(sum(weights))
        out = None
        for w, m in zip(weights, model.models):
            z = taskpool.logits(m, task, inputs).float() * (w / total)
            out = z if out is None else out + z
        assert out is not None
        return out
    return taskpool.logits(model, task, inputs)


def evaluate(taskpool: TaskPool, evaluable: Evaluable, *, tasks: Sequence[str] | None = None,
             limit: int | None = None, device: torch.device | str = "cpu", batch_size: int = 256,
             progress: Callable[..., Iterator[Any]] | None = None, split: str = "test") -> Metrics:
    """{task: {"accuracy": fraction correct, "loss": mean cross-entropy}} on each task's `split` (test by default)."""
    device = torch.device(device)
    tasks = list(tasks) if tasks is not None else taskpool.tasks
    if isinstance(taskpool, ScoresModels):
        return taskpool.score_model(evaluable, tasks=tasks, limit=limit, device=device, batch_size=batch_size,
                                    split=split)
    if isinstance(evaluable, PerTaskModels):
        missing = [t for t in tasks if t not in evaluable.models]
        if missing:
            raise ValueError(f"the per-task models lack tasks {missing}")
    results: Metrics = {}
    for task in tasks:
        if isinstance(evaluable, PerTaskModels):
            model: nn.Module | Ensemble = _prepare(evaluable.models[task], device)
        elif isinstance(evaluable, Ensemble):
            model = Ensemble([_prepare(m, device) for m in evaluable.models], evaluable.weights)
        else:
            model = _prepare(evaluable, device)
        specs = list(taskpool.metrics(task))
        keep = any(s.compute is not None for s in specs)  # whole-split metrics need every output
        correct, seen, loss_sum, regression = 0, 0, 0.0, False
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        batches = taskpool.batches(task, split, batch_size=batch_size, limit=limit)
        if progress is not None:
            batches = progress(batches, desc=f"eval {task}")
        with torch.inference_mode():
            for inputs, labels in batches:
                inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                logits = task_logits(taskpool, model, task, inputs).float()
                if not bool(torch.isfinite(logits).all()):
                    bad = int((~torch.isfinite(logits)).sum())
                    raise NonFiniteOutput(f"task {task!r}: the model's outputs hold {bad} NaN or infinite values "
                                          f"(of {logits.numel()} in a batch of {len(logits)}); no score is stored")
                if keep:
                    kept.append((logits.cpu(), labels.cpu()))
                if labels.is_floating_point():  # regression targets (STS-B): no accuracy, no cross-entropy
                    regression = True
                    seen += int(labels.shape[0])
                    continue
                correct += int((logits.argmax(-1) == labels).sum())
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                seen += int(labels.numel())
        if seen == 0:
            raise ValueError(f"task {task!r} of task pool {taskpool.name!r} has no {split} examples")
        row: dict[str, float] = {"examples": float(seen)}
        if not regression:
            row.update(accuracy=correct / seen, loss=loss_sum / seen)
        if keep:
            all_logits = torch.cat([z for z, _ in kept])
            all_labels = torch.cat([y for _, y in kept])
            for spec in specs:
                if spec.compute is not None:
                    row[spec.name] = float(spec.compute(all_logits, all_labels))
        results[task] = row
    return results


def primary_metrics(taskpool: TaskPool, tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{task: {"metric": name, "higher_is_better": bool}}: the metric tables average for each task."""
    out = {}
    for task in tasks:
        spec = list(taskpool.metrics(task))[0]
        out[task] = {"metric": spec.name, "higher_is_better": spec.higher_is_better}
    return out


def primary_value(metrics: Metrics, primary: dict[str, dict[str, Any]], task: str) -> float | None:
    """The primary metric of `task` in `metrics` (accuracy when `primary` does not name one)."""
    name = primary.get(task, {}).get("metric", "accuracy")
    return metrics.get(task, {}).get(name)
