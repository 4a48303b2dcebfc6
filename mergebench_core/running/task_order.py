"""The task-order axis of continual methods: which orders a grid runs, the order each seed stands for, and the curve
of a continual cell (the accuracy on the tasks seen so far after each arrival).

Order 0 is the pool's own order; order k > 0 is the permutation `torch.randperm(n)` drawn from a generator seeded
with k, so an order seed names the same order on every machine. `--task-orders N` runs orders 0 … N−1, `--task-order
K` (repeatable, comma-separated) the named ones. Only continual methods are expanded; every other cell has no order.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mergebench_core.contract.continual import is_continual
from mergebench_core.errors import ConfigError


def permutation(names: Sequence[str], order: int) -> list[str]:
    """The experts `names` in order `order` (0: as given)."""
    if order < 0:
        raise ConfigError(f"task order {order}: order seeds are whole numbers ≥ 0 (0 is the pool's own order)")
    if order == 0:
        return list(names)
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(order))
    return [names[int(i)] for i in perm]


def order_seeds(count: int | None = None, seeds: Sequence[int] | None = None) -> tuple[int, ...]:
    """The order seeds a run names: `--task-orders N` (0 … N−1) and/or `--task-order K,…`; (0,) when neither."""
    if count is not None and count < 1:
        raise ConfigError(f"--task-orders {count}: run at least one order (1 is the pool's own order)")
    chosen = list(range(count)) if count is not None else []
    for s in seeds or ():
        if s < 0:
            raise ConfigError(f"--task-order {s}: order seeds are whole numbers ≥ 0 (0 is the pool's own order)")
        chosen.append(s)
    return tuple(dict.fromkeys(chosen)) or (0,)


def with_orders(cells: Sequence[Any], orders: Sequence[int]) -> list[Any]:
    """Each continual cell once per order seed (others as they are); their `order` is set."""
    out = []
    for cell in cells:
        if is_continual(cell.method_cls):
            out += [dataclasses.replace(cell, order=o) for o in orders]
        else:
            out.append(cell)
    return out


class CurveRecorder:
    """`RunContext.on_step` for a continual cell: scores the model on the tasks of the experts merged so far, keeps
    one curve point per step, and the seconds spent scoring (not the merge's time)."""

    def __init__(self, task_of: Callable[[str], str], evaluate: Callable[[Any, list[str]], Mapping[str, Any]],
                 primary_mean: Callable[[Any], float | None]):
        self.task_of, self.evaluate, self.primary_mean = task_of, evaluate, primary_mean
        self.curve: list[dict[str, Any]] = []
        self.seconds = 0.0

    def __call__(self, step: int, experts: Sequence[str], model: Any) -> None:
        start = time.perf_counter()
        tasks = list(dict.fromkeys(self.task_of(e) for e in experts))
        metrics = self.evaluate(model, tasks)
        self.curve.append({"step": step, "expert": experts[-1], "tasks": tasks,
                           "mean": self.primary_mean(metrics), "metrics": metrics})
        self.seconds += time.perf_counter() - start
