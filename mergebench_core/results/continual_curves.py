"""The curves of continual methods as data: per configuration, the mean score on the tasks seen so far after each
arrival, averaged over task orders and seeds (`mergebench plot continual` draws them, `results.plots`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mergebench_core.results.labels import canonical
from mergebench_core.results.store import CellResult
from mergebench_core.results.tables import newest_per_seed


def curves(results: Sequence[CellResult]) -> dict[tuple[str, str], dict[tuple[str, Any], list[CellResult]]]:
    """{(model pool, task pool): {(method, params): the ok rows with a curve (one per seed and order)}}."""
    out: dict[tuple[str, str], dict[tuple[str, Any], list[CellResult]]] = {}
    for r in newest_per_seed([r for r in results if r.status == "ok" and r.curve]):
        out.setdefault((r.modelpool, r.taskpool), {}).setdefault((r.method, canonical(r.params)), []).append(r)
    return out


def mean_curve(rows: Sequence[CellResult]) -> tuple[list[float], list[float]]:
    """Per step, the mean and the sample standard deviation (0 for one row) of the seen-task score over `rows`."""
    steps = min(len(r.curve or []) for r in rows)
    means, stds = [], []
    for t in range(steps):
        values = [float(r.curve[t]["mean"]) for r in rows if r.curve and r.curve[t].get("mean") is not None]
        m = sum(values) / len(values) if values else math.nan
        var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        means.append(m)
        stds.append(math.sqrt(var))
    return means, stds
