"""CLIP zero-shot task pools (TA8 / TA14 / TA20 × ViT-B/32, B/16, L/14) for mergebench.

Registered names: `clip-zeroshot-vit-<size>_<suite>`, for example `clip-zeroshot-vit-b32_TA8`; the CLIP model pools
(distribution mergebench-clip) name them as their default task pools.
"""

from __future__ import annotations

from functools import partial

from mergebench_core import hookimpl

from .catalog import BASE_MODELS, SUITES, TaskSpec, suite, task
from .taskpool import CLIPZeroShotTaskPool, taskpool_name

__all__ = ["BASE_MODELS", "SUITES", "CLIPZeroShotTaskPool", "TaskSpec", "suite", "task", "taskpool_name"]


@hookimpl
def register_taskpools(register):
    for size, base in BASE_MODELS.items():
        for suite_name in SUITES:
            register(taskpool_name(size, suite_name), partial(CLIPZeroShotTaskPool, size, suite_name),
                     f"{len(suite(suite_name))} CLIP zero-shot tasks, heads from {base}")
