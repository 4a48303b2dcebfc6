"""`minilm_text8` and `minilm_text8-lora16`: real pretrained MiniLM, eight real text tasks, experts built here.

The model pools hold the encoder (`MiniLMEncoder`); the task pool `minilm-text_TA8` scores it through each task's
frozen prototype head on 200 held-out texts per task. Both model pools share the pretrained model and the heads, so
one task pool scores either and every parameter setting (`minilm_text8(lr=5e-05,seed=1)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core import PRETRAINED, TaskPool
from mergebench_core.cache import key_digest
from mergebench_core.data.splits import validation_indices
from mergebench_core.pools.folder import CheckpointPool
from mergebench_core.errors import CheckpointError

from . import sources
from .build import (MinilmParams, PoolCache, build_expert, build_heads, build_pretrained, expert_key, heads_key,
                    pretrained_key)
from .encoder import MiniLMEncoder, encode
from .tasks import TASKS, load_task

__all__ = ["LORA_POOL_NAME", "POOL_NAME", "TASKPOOL_NAME", "MinilmLoraParams", "MinilmModelPool", "MinilmTaskPool",
           "pool_name"]

POOL_NAME = "minilm_text8"
LORA_POOL_NAME = "minilm_text8-lora16"
TASKPOOL_NAME = "minilm-text_TA8"


@dataclass(frozen=True)
class MinilmLoraParams(MinilmParams):
    """The LoRA pool's recipe: as the full pool's, with Adam at 1e-3 (adapters start at zero)."""

    lr: float = 1e-3


def pool_name(base: str, params: MinilmParams) -> str:
    """The pool's name with the parameters that differ from its defaults, sorted: `minilm_text8(lr=5e-05)`."""
    default = type(params)()
    changed = [f"{f.name}={getattr(params, f.name)!r}" for f in sorted(dataclasses.fields(params), key=lambda f: f.name)
               if getattr(params, f.name) != getattr(default, f.name)]
    return f"{base}({','.join(changed)})" if changed else base


class _Shared:
    """The pretrained checkpoint and the heads, built once per cache and shared by both pools and the task pool."""

    def __init__(self, root: Path | None, tasks: tuple[str, ...]):
        self.cache = PoolCache(root)
        self.tasks = tasks

    def pretrained_path(self) -> Path:
        return self.cache.path_of(pretrained_key(), build_pretrained, "the pretrained MiniLM checkpoint")

    def heads(self) -> dict[str, torch.Tensor]:
        with torch.inference_mode(False):  # methods backpropagate through the heads (Fisher, AdaMerging)
            entry = self.cache.get_or_build(heads_key(self.tasks), lambda: build_heads(self.tasks),
                                            f"the {TASKPOOL_NAME} heads")
            return {t: entry.tensors[t].clone() for t in self.tasks}


class MinilmModelPool(CheckpointPool):
    """The pretrained all-MiniLM-L6-v2 encoder and one expert per task, fully fine-tuned or through LoRA."""

    default_taskpool = TASKPOOL_NAME

    def __init__(self, kind: str = "full", params: MinilmParams | None = None, root: Path | None = None,
                 tasks: tuple[str, ...] = TASKS):
        self.kind = kind
        self.params = params or (MinilmLoraParams() if kind == "lora" else MinilmParams())
        self.base_name = LORA_POOL_NAME if kind == "lora" else POOL_NAME
        self.name = pool_name(self.base_name, self.params)
        self.tasks = tuple(tasks)
        self.shared = _Shared(root, self.tasks)

    @property
    def expert_names(self) -> list[str]:
        return list(self.tasks)

    def model_names(self) -> list[str]:
        return [PRETRAINED, *self.tasks]

    @cached_property
    def _heads(self) -> dict[str, torch.Tensor]:
        return self.shared.heads()

    def checkpoint_path(self, name: str) -> Path:
        if name == PRETRAINED:
            return self.shared.pretrained_path()
        if name not in self.tasks:
            raise KeyError(f"pool {self.name!r} has no model {name!r}; models: {', '.join(self.model_names())}")
        key = expert_key(self.kind, self.params, name)
        return self.shared.cache.path_of(key, lambda: build_expert(self.kind, self.params, name, self._heads[name]),
                                         f"the {self.name} expert {name!r}")

    def build_model(self) -> nn.Module:
        return MiniLMEncoder()

    def load_model(self, name: str) -> nn.Module:
        model = self.build_model()
        try:
            model.load_state_dict(self.state_dict(name))
        except RuntimeError as exc:
            raise CheckpointError(f"pool {self.name!r}: model {name!r} does not fit MiniLM: {exc}") from exc
        return model.eval()

    def identity(self, name: str) -> str:
        key = pretrained_key() if name == PRETRAINED else expert_key(self.kind, self.params, name)
        return f"{self.base_name}/{key_digest(key)[:16]}/{name}"

    def version_info(self) -> dict[str, str]:
        return {"minilm_sources": key_digest({s.pin: s.files for s in sources.SOURCES})[:16],
                "minilm_experts": key_digest([expert_key(self.kind, self.params, t) for t in self.tasks])[:16]}

    def missing_resources(self) -> list[str]:
        return sources.missing()


class MinilmTaskPool(TaskPool):
    """Accuracy of a MiniLM encoder through each task's frozen prototype head, on 200 held-out texts per task."""

    def __init__(self, root: Path | None = None, tasks: tuple[str, ...] = TASKS):
        self.name = TASKPOOL_NAME
        self._tasks = tuple(tasks)
        self.shared = _Shared(root, self._tasks)
        self._ids: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @cached_property
    def heads(self) -> dict[str, torch.Tensor]:
        return self.shared.heads()

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def _split(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if task not in self._tasks:
            raise KeyError(f"task pool {self.name!r} has no task {task!r}; tasks: {', '.join(self._tasks)}")
        if split not in ("train", "test", "val"):
            raise KeyError(f"task pool {self.name!r} has splits train, val and test; got {split!r}")
        key = (task, split)
        if key not in self._ids:
            texts, labels = load_task(task).split("train" if split == "val" else split)
            ids, y = encode(texts), torch.tensor(labels, dtype=torch.int64)
            if split == "val":
                keep = validation_indices(len(y))
                ids, y = ids[keep], y[keep]
            self._ids[key] = (ids, y)
        return self._ids[key]

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ids, y = self._split(task, split)
        if limit is not None:
            ids, y = ids[:limit], y[:limit]
        for i in range(0, len(y), batch_size):
            yield ids[i:i + batch_size], y[i:i + batch_size]

    def num_examples(self, task: str, split: str = "test") -> int:
        return len(self._split(task, split)[1])

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        head = self.heads[task]
        features = model(inputs)
        if head.device != features.device or head.dtype != features.dtype:
            head = head.to(device=features.device, dtype=features.dtype)
        return F.linear(F.normalize(features, dim=-1), head)

    def version_info(self) -> dict[str, str]:
        return {"minilm_heads": key_digest(heads_key(self._tasks))[:16]}

    def missing_resources(self) -> list[str]:
        return sources.missing()


def full_pool(params: MinilmParams = MinilmParams()) -> MinilmModelPool:
    return MinilmModelPool("full", params)


def lora_pool(params: MinilmLoraParams = MinilmLoraParams()) -> MinilmModelPool:
    return MinilmModelPool("lora", params)


def taskpool() -> MinilmTaskPool:
    return MinilmTaskPool()
