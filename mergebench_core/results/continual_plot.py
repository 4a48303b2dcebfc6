"""`mergebench plot continual`: the curve of continual methods, the mean score on the tasks seen so far after each
arrival, averaged over task orders and seeds (a band of ± one standard deviation where there are several).

The dashed line is the experts' mean over all tasks (each expert on its own task): what a merge of every expert
would ideally reach at the last step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergebench_core.errors import MergebenchError
from mergebench_core.results.labels import canonical
from mergebench_core.results.plots import _check_out, _pyplot, _save, _say_where, distinct_colors, fitted_title
from mergebench_core.results.store import CellResult
from mergebench_core.results.tables import newest_per_seed, select_methods


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


def _label(method: str, params: Any, several: bool) -> str:
    if not several or not params:
        return method
    shown = ", ".join(f"{k}={v}" for k, v in (params if isinstance(params, tuple) else ()))
    return f"{method} ({shown})" if shown else method


def continual_figure(results: Sequence[CellResult], out: str | Path, *, methods: Sequence[str] | None = None,
                     modelpool: str | None = None, taskpool: str | None = None) -> list[Path]:
    """One figure per pool: x = tasks seen, y = mean score on them (%), one line per method configuration."""
    out = _check_out(out)
    found = {k: v for k, v in curves(results).items()
             if (modelpool is None or k[0] == modelpool) and (taskpool is None or k[1] == taskpool)}
    if not found:
        raise MergebenchError("no stored continual results (rows with a task-order curve); run a continual method, "
                              "e.g. `mergebench run -m opcm --task-orders 3`")
    wanted = select_methods(methods, [m for v in found.values() for m, _ in v])
    plt = _pyplot()
    written = []
    for pool, configs in found.items():
        configs = {k: v for k, v in configs.items() if wanted is None or k[0] in wanted}
        if not configs:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        colors = distinct_colors(len(configs))
        per_method = {m for m, _ in configs}
        orders = set()
        for color, ((method, params), rows) in zip(colors, sorted(configs.items(), key=lambda kv: kv[0][0])):
            means, stds = mean_curve(rows)
            xs = list(range(1, len(means) + 1))
            orders |= {r.task_order for r in rows}
            label = _label(method, params, len(per_method) < len(configs)) + f"  (n={len(rows)})"
            ax.plot(xs, [100 * m for m in means], marker="o", color=color, label=label)
            if len(rows) > 1:
                ax.fill_between(xs, [100 * (m - s) for m, s in zip(means, stds)],
                                [100 * (m + s) for m, s in zip(means, stds)], color=color, alpha=0.18)
        _reference(ax, results, pool)
        ax.set_xlabel("tasks seen (experts merged so far)")
        ax.set_ylabel("mean accuracy on the tasks seen (%)")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        ax.set_title(fitted_title(f"continual merging on {pool[0]} ({len(orders)} task order(s))", 6.4))
        fig.tight_layout()
        written.append(_save(plt, fig, out, pool, list(found)))
    if not written:
        raise MergebenchError(f"no continual results for method(s) {', '.join(methods or [])}")
    _say_where(out, written)
    return written


def _reference(ax: Any, results: Sequence[CellResult], pool: tuple[str, str]) -> None:
    """The experts' mean over all tasks, as a dashed line: what a merge at the last step would ideally reach."""
    for r in results:
        if (r.kind, r.method, r.modelpool, r.taskpool, r.status) == ("reference", "individual", *pool, "ok") \
                and r.mean is not None:
            ax.axhline(100 * r.mean, color="0.35", linestyle="--", linewidth=1, label="experts (all tasks)")
            return
