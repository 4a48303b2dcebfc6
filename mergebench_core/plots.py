"""Figures from the results store (matplotlib, an optional dependency: `pip install mergebench[plot]`).

`pareto_figure` draws each method's preference front on every pair of a pool's tasks, with the pretrained model and
the experts (each on its own task: the ideal point merging aims at) as markers. The format follows the file name
(PNG, SVG or PDF).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import MergebenchError
from .evaluation import primary_value
from .pareto import front_summaries
from .store import CellResult

PLOT_FORMATS = (".png", ".svg", ".pdf")
MAX_PAIRS = 6


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed (servers, CI)
        import matplotlib.pyplot as plt
    except ImportError:
        raise MergebenchError("plots need matplotlib: pip install 'mergebench[plot]'") from None
    return plt


def _reference_point(results: Sequence[CellResult], pool: tuple[str, str], label: str,
                     tasks: Sequence[str]) -> list[float] | None:
    for r in results:
        if (r.kind, r.method, r.modelpool, r.taskpool, r.status) == ("reference", label, *pool, "ok"):
            values = [primary_value(r.metrics, r.primary_metrics, t) for t in tasks]
            return None if any(v is None for v in values) else [float(v) for v in values]  # type: ignore[arg-type]
    return None


def pareto_figure(results: Sequence[CellResult], out: str | Path, *, modelpool: str | None = None) -> list[Path]:
    """One figure per (model pool, task pool) with fronts: `out` itself when there is one, else `out` with the pool
    name appended. Returns the files written."""
    out = Path(out)
    if out.suffix.lower() not in PLOT_FORMATS:
        raise MergebenchError(f"plot file {str(out)!r}: use a .png, .svg or .pdf name")
    fronts = [f for f in front_summaries(results) if modelpool is None or f.modelpool == modelpool]
    fronts = [f for f in fronts if len(f.tasks) >= 2]
    if not fronts:
        raise MergebenchError("no stored cell has scores on two or more tasks to draw a front from; run "
                              "preference-aware methods with --preferences simplex:K on two or more tasks first")
    plt = _pyplot()
    pools = list(dict.fromkeys((f.modelpool, f.taskpool) for f in fronts))
    written = []
    for pool in pools:
        mine = [f for f in fronts if (f.modelpool, f.taskpool) == pool]
        tasks = mine[0].tasks
        pairs = list(itertools.combinations(range(len(tasks)), 2))[:MAX_PAIRS]
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.8 * len(pairs), 4.4), squeeze=False)
        markers = {label: _reference_point(results, pool, label, tasks) for label in ("pretrained", "individual")}
        for ax, (i, j) in zip(axes[0], pairs):
            for front in mine:
                if front.tasks != tasks:
                    continue
                label = front.method if len({f.method for f in mine}) == len(mine) else \
                    f"{front.method} {front.params}"
                dots = ax.scatter([p[i] * 100 for p in front.scores], [p[j] * 100 for p in front.scores],
                                  s=18, alpha=0.5)
                line = sorted(front.front, key=lambda p: p[i])
                ax.plot([p[i] * 100 for p in line], [p[j] * 100 for p in line], color=dots.get_facecolor()[0],
                        label=label, linewidth=1.5)
            for name, marker, text in (("pretrained", "s", "pretrained"), ("individual", "*", "experts (ideal)")):
                point = markers[name]
                if point is not None:
                    ax.scatter([point[i] * 100], [point[j] * 100], marker=marker, s=120, color="black", label=text,
                               zorder=3)
            ax.set_xlabel(f"{tasks[i]} (%)")
            ax.set_ylabel(f"{tasks[j]} (%)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8, loc="lower left")
        fig.suptitle(f"{pool[0]} on {pool[1]}: preference fronts", fontsize=10)
        fig.tight_layout()
        path = out if len(pools) == 1 else out.with_name(f"{out.stem}-{_safe(pool[0])}{out.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
