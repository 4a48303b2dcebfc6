"""Methods that are one fixed task-vector pipeline: task arithmetic and MagMax.

They used to write their own arithmetic beside the pipeline; as presets they run through the same streaming engine,
trims and checks as TIES or DARE, and differ from them only in the stages they leave out. Each keeps the arithmetic it
had before (`Pipeline.sum_by`, `Pipeline.scale_by`), so their stored numbers stay the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

from mergebench_core.engine.pipeline import Pipeline


def task_arithmetic(scaling_factor: float) -> Pipeline:
    """Task arithmetic, θ_0 + λ Σ_t τ_t: no drop, trim or election; torch's sum, then the rounded product added."""
    return Pipeline(scale=scaling_factor, sum_by="torch", scale_by="product")


def magmax(scaling_factor: float) -> Pipeline:
    """MagMax, θ_0 + λ τ_max: per entry the task-vector value of largest magnitude (the later task on ties)."""
    return Pipeline(combine="max", scale=scaling_factor, scale_by="product")


PRESETS: dict[str, Callable[[float], Pipeline]] = {"task_arithmetic": task_arithmetic, "magmax": magmax}
"""The preset pipelines by method name, each from its scaling factor λ."""
