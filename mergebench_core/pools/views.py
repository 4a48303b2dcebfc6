"""Pools addressed by extended names: pool parameters, a subset of a pool's tasks, and derived pools.

A pool name may carry three suffixes, each optional:

    digits-mlp_TA8(lr=3e-05)+finetune(steps=100)[digits,rot90]
    └─ base pool ─┘└─ its parameters (pools that declare them, `mergebench_core.pools.params`) ─┘
                            └─ derived: every expert re-trained by a training method, with its parameters ─┘
                                                         └─ tasks: only the experts of these tasks, scored on them ─┘

The name is the pool's identity in the store and in every table, so a two-task front never mixes with the
eight-task grid, a recipe variant never mixes with the default recipe, and a derived pool shows its recipe where
its numbers are printed. The runner stores the canonical form: the base pool's parameters with sorted keys, only
non-default values, numbers in one spelling (`pool_params.canonical_params`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergebench_core.contract.api import Batch, MetricSpec, ModelPool, TaskPool
from mergebench_core.contract.config import split_top_level
from mergebench_core.errors import ConfigError

_NAME = re.compile(r"^(?P<base>[^+\[\]()]+)(?:\((?P<base_params>[^()]*)\))?"
                   r"(?:\+(?P<method>[^+\[\]()]+)(?:\((?P<params>[^()]*)\))?)?"
                   r"(?:\[(?P<tasks>[^\[\]]*)\])?$")


@dataclass(frozen=True)
class PoolName:
    base: str
    method: str | None = None
    params: tuple[str, ...] = ()
    """`key=value` items, as written."""
    tasks: tuple[str, ...] | None = None
    base_params: tuple[str, ...] = ()
    """The base pool's `key=value` items, as written (`POOL(k=v)`); last, so positional construction keeps working."""

    @classmethod
    def parse(cls, name: str) -> PoolName:
        m = _NAME.match(name.strip())
        if not m:
            raise ConfigError(f"pool name {name!r} is not of the form POOL, POOL(k=v,...), POOL+METHOD, "
                              f"POOL+METHOD(k=v,...), POOL(k=v,...)+METHOD(k=v,...), or any of these followed by "
                              f"[task,task,...]")
        params = tuple(p.strip() for p in (m["params"] or "").split(",") if p.strip())
        base_params = tuple(p.strip() for p in split_top_level(m["base_params"] or "") if p.strip())
        tasks = tuple(t.strip() for t in m["tasks"].split(",") if t.strip()) if m["tasks"] is not None else None
        if tasks is not None and not tasks:
            raise ConfigError(f"pool name {name!r} selects no tasks inside [...]")
        return cls(m["base"].strip(), m["method"].strip() if m["method"] else None, params, tasks, base_params)

    @property
    def pool(self) -> str:
        """The base pool with its parameters: `POOL` or `POOL(k=v,...)`."""
        return self.base + (f"({','.join(self.base_params)})" if self.base_params else "")

    @property
    def unrestricted(self) -> str:
        """The name without its task selection."""
        out = self.pool
        if self.method:
            out += f"+{self.method}" + (f"({','.join(self.params)})" if self.params else "")
        return out

    def with_tasks(self, tasks: Sequence[str] | None) -> str:
        return self.unrestricted + (f"[{','.join(tasks)}]" if tasks else "")


def check_tasks(selected: Sequence[str], available: Sequence[str], where: str) -> None:
    """Every selected task exists; an unknown one is named with the closest known ones."""
    import difflib

    for task in selected:
        if task not in available:
            close = difflib.get_close_matches(task, list(available), n=2)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"--tasks: {where} has no task {task!r}.{hint} Its tasks: {', '.join(available)}")
    if len(set(selected)) != len(selected):
        raise ConfigError(f"--tasks names a task twice: {', '.join(selected)}")


class TaskSubsetModelPool(ModelPool):
    """A model pool restricted to the experts of some tasks (independent pools keep every model: none is tied to
    one task). Everything else, optional capabilities included, is the wrapped pool's."""

    def __init__(self, inner: ModelPool, tasks: Sequence[str], name: str):
        self.inner, self.selected, self.name = inner, tuple(tasks), name
        self.default_taskpool = inner.default_taskpool
        self.has_pretrained, self.relation = inner.has_pretrained, inner.relation
        if inner.relation == "finetuned":
            check_tasks(self.selected, [inner.task_of(e) for e in inner.expert_names], f"model pool {inner.name!r}")

    @property
    def expert_names(self) -> list[str]:
        if self.relation == "independent":
            return list(self.inner.expert_names)
        return [e for e in self.inner.expert_names if self.inner.task_of(e) in self.selected]

    def load_model(self, name: str) -> nn.Module:
        return self.inner.load_model(name)

    def task_of(self, expert: str) -> str:
        return self.inner.task_of(expert)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return self.inner.state_dict(name)

    def identity(self, name: str) -> str:
        return self.inner.identity(name)

    def version_info(self) -> dict[str, str]:
        return self.inner.version_info()

    def permutation_spec(self) -> Any:
        return self.inner.permutation_spec()

    def missing_resources(self) -> list[str]:
        return self.inner.missing_resources()

    def __getattr__(self, attr: str) -> Any:  # optional capabilities (tensor_source, ...) pass through
        if attr.startswith("__") or attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)


class TaskSubsetTaskPool(TaskPool):
    """A task pool restricted to some of its tasks, in the order the selection names them."""

    def __init__(self, inner: TaskPool, tasks: Sequence[str], name: str):
        check_tasks(tasks, inner.tasks, f"task pool {inner.name!r}")
        self.inner, self.selected, self.name = inner, tuple(tasks), name

    @property
    def tasks(self) -> list[str]:
        return list(self.selected)

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterable[Batch]:
        return self.inner.batches(task, split, batch_size=batch_size, limit=limit)

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(model, task, inputs)

    def num_examples(self, task: str, split: str = "test") -> int | None:
        return self.inner.num_examples(task, split)

    def metrics(self, task: str) -> Sequence[MetricSpec]:
        return self.inner.metrics(task)

    def version_info(self) -> dict[str, str]:
        return self.inner.version_info()

    def missing_resources(self) -> list[str]:
        return self.inner.missing_resources()

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)
