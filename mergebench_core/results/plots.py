"""Figures from the results store (matplotlib, an optional dependency: `pip install mergebench[plot]`).

Each kind draws one figure per (model pool, task pool): the file named by `out` when there is one pool, else `out`
with the pool's name appended, and a warning that says so (choosing one pool gives exactly `out`). The format
follows the file name (PNG, SVG or PDF). Rows are the leaderboard's (`tables.build_tables`): a configuration's seeds
are averaged, error bars are their sample standard deviation, and labels name every non-default parameter. Methods
are never drawn in grey, the reference rows' colour; titles wrap rather than run off the figure.

- `pareto_figure`: each method's preference front on every pair of a pool's tasks (configurations run at one
  preference as single points), with the pretrained model and the experts (each on its own task: the ideal point
  merging aims at) as markers, and the legend beside the axes.
- `tasks_figure`: per-task bars (and the average) for chosen configurations, beside the reference rows.
- `time_figure`: a score against merge time, one point per configuration.
- `sweep_figure`: a score against one parameter's values, a line per method (and per setting of its other
  parameters), with seed error bars.
- `continual_figure`: continual methods' curves (`continual_curves`), the score on the tasks seen after each arrival,
  averaged over task orders and seeds.
"""

from __future__ import annotations

import itertools
import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergebench_core.data.evaluation import primary_value
from mergebench_core.errors import MergebenchError
from mergebench_core.preferences.pareto import front_summaries
from mergebench_core.results.continual_curves import curves, mean_curve
from mergebench_core.results.labels import front_labels, short_value
from mergebench_core.results.rows import COLUMN_ALIASES, SUMMARY_COLUMNS, Column, Row, Table, metric_title
from mergebench_core.results.store import CellResult
from mergebench_core.results.tables import build_tables, select_methods, task_column

log = logging.getLogger(__name__)

PLOT_FORMATS = (".png", ".svg", ".pdf")
KINDS = ("pareto", "tasks", "time", "sweep", "continual")
MAX_PAIRS = 6
MAX_BARS = 8
"""Configurations in a bar chart when none are chosen: the best by average."""
ANNOTATE_AT_MOST = 8
"""Points of a time plot labelled beside the point (more are told apart by the legend only)."""
MARKERS = ("o", "s", "^", "D", "v", "P")
LEGEND_INCHES = 2.8
"""Width added to a figure for the legend beside its axes."""
GREYS = ("#7f7f7f", "#c7c7c7")
"""Matplotlib's tab10/tab20 greys: left out of method colours, because the reference rows are drawn in grey."""


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
    name appended (and a warning that says so). Configurations run at more than one preference are drawn as fronts
    (their points, the non-dominated ones joined); those run at one preference or none as single points. The
    legend sits beside the axes, so it never hides the pretrained and expert markers. Returns the files written."""
    out = _check_out(out)
    fronts = [f for f in front_summaries(results) if modelpool is None or f.modelpool == modelpool]
    fronts = [f for f in fronts if len(f.tasks) >= 2]
    with_axis = {(f.modelpool, f.taskpool) for f in fronts if f.points > 1}
    fronts = [f for f in fronts if (f.modelpool, f.taskpool) in with_axis]  # pools that were run at preferences
    if not fronts:
        raise MergebenchError("no stored cell has scores on two or more tasks to draw a front from; run "
                              "preference-aware methods with --preferences simplex:K on two or more tasks first")
    plt = _pyplot()
    pools = list(dict.fromkeys((f.modelpool, f.taskpool) for f in fronts))
    written = []
    for pool in pools:
        mine = [f for f in fronts if (f.modelpool, f.taskpool) == pool]
        tasks = mine[0].tasks
        mine = [f for f in mine if f.tasks == tasks]
        mine.sort(key=lambda f: f.points == 1)  # fronts first, then single points, each in store order
        pairs = list(itertools.combinations(range(len(tasks)), 2))[:MAX_PAIRS]
        width = 4.6 * len(pairs) + LEGEND_INCHES
        fig, axes = plt.subplots(1, len(pairs), figsize=(width, 4.4), squeeze=False)
        markers = {label: _reference_point(results, pool, label, tasks) for label in ("pretrained", "individual")}
        labels = dict(zip(map(id, mine), front_labels(mine), strict=True))
        colors = dict(zip(map(id, mine), distinct_colors(len(mine)), strict=True))
        for ax, (i, j) in zip(axes[0], pairs):
            for front in mine:
                color = colors[id(front)]
                if front.points == 1:
                    ((x, y),) = [(p[i], p[j]) for p in front.scores]
                    ax.scatter([x * 100], [y * 100], marker="D", s=30, color=color, edgecolors="0.15",
                               linewidths=0.5, label=labels[id(front)], zorder=2)
                    continue
                ax.scatter([p[i] * 100 for p in front.scores], [p[j] * 100 for p in front.scores], s=18, alpha=0.5,
                           color=color)
                line = sorted(front.front, key=lambda p: p[i])
                ax.plot([p[i] * 100 for p in line], [p[j] * 100 for p in line], color=color, marker="o",
                        markersize=3, label=labels[id(front)], linewidth=1.5)
            for name, marker, text in (("pretrained", "s", "pretrained"), ("individual", "*", "experts (ideal)")):
                point = markers[name]
                if point is not None:
                    ax.scatter([point[i] * 100], [point[j] * 100], marker=marker, s=120, color="black", label=text,
                               zorder=3)
            ax.set_xlabel(f"{tasks[i]} (%)")
            ax.set_ylabel(f"{tasks[j]} (%)")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        fig.suptitle(fitted_title(f"{pool[0]} on {pool[1]}: preference fronts", width), fontsize=10)
        fig.tight_layout()
        written.append(_save(plt, fig, out, pool, pools))
    _say_where(out, written)
    return written


def distinct_colors(count: int) -> list[str]:
    """`count` colours for methods, none of them grey: tab10's nine, then tab20's eighteen, repeated beyond that."""
    from matplotlib import colormaps  # the caller has imported matplotlib through `_pyplot`
    from matplotlib.colors import to_hex

    palette = "tab10" if count <= 9 else "tab20"
    colors = [to_hex(c) for c in colormaps[palette].colors]  # type: ignore[attr-defined]
    colors = [c for c in colors if c not in GREYS]
    return [colors[k % len(colors)] for k in range(count)]


def fitted_title(text: str, width_inches: float, fontsize: float = 10.0) -> str:
    """`text` broken into lines that fit `width_inches` at `fontsize` points (about 0.55 em a character), at spaces
    where it can and inside a long pool name where it must, so a title is never cut at the figure's edges."""
    per_line = max(20, int(width_inches * 72 / (0.55 * fontsize)))
    return textwrap.fill(text, width=per_line, break_long_words=True, break_on_hyphens=False)


def _say_where(out: Path, written: Sequence[Path]) -> None:
    """Several pools give one file each, none of them `out` itself: say so, and how to get exactly `out`."""
    if len(written) > 1:
        log.warning("%d pools drawn, one file each (%s); %s itself was not written: choose one pool with "
                    "--modelpool/--taskpool to get exactly that file", len(written),
                    ", ".join(p.name for p in written), out.name)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in PLOT_FORMATS:
        raise MergebenchError(f"plot file {str(out)!r}: use a .png, .svg or .pdf name")
    return out


def _save(plt: Any, fig: Any, out: Path, pool: tuple[str, str], pools: Sequence[tuple[str, str]]) -> Path:
    """Write `fig` to `out`, or, when several pools are drawn, to `out` with the model pool's name appended (and the
    task pool's, when one model pool is scored by several)."""
    if len(pools) == 1:
        path = out
    else:
        twice = sum(p[0] == pool[0] for p in pools) > 1
        path = out.with_name(f"{out.stem}-{_safe(pool[0])}" + (f"-{_safe(pool[1])}" if twice else "") + out.suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Date": None} if path.suffix.lower() == ".svg" else None)
    plt.close(fig)
    return path


def _tables(results: Sequence[CellResult], modelpool: str | None, taskpool: str | None) -> list[Table]:
    tables = [t for t in build_tables(results) if (modelpool is None or t.modelpool == modelpool)
              and (taskpool is None or t.taskpool == taskpool)]
    if not any(t.methods for t in tables):
        where = " ".join(x for x in (modelpool and f"on {modelpool}", taskpool and f"scored by {taskpool}") if x)
        raise MergebenchError(f"no stored method results {where}".rstrip() + "; run `mergebench run` first")
    return tables


def _chosen(tables: Sequence[Table], methods: Sequence[str] | None) -> set[str] | None:
    """The method names asked for, checked against what the store holds (None: all)."""
    return select_methods(methods, [r.method for t in tables for r in t.methods])


def _score_column(table: Table, score: str) -> Column:
    """`avg`, `norm`, or a task's name: the column a plot's y axis shows."""
    key = COLUMN_ALIASES.get(score.lower(), score.lower())
    if key in ("avg", "norm"):
        return SUMMARY_COLUMNS[key]
    if score in table.tasks:
        return task_column(table, score)
    raise MergebenchError(f"--score {score!r}: use avg, norm or one of the tasks ({', '.join(table.tasks)})")


def _axis_label(table: Table, column: Column) -> str:
    """`accuracy (%)` when the scores are accuracies (every task's, for the average), else the metric, × 100."""
    if column.task is not None:
        metric = table.primary[column.task].get("metric", "accuracy")
        return f"{column.task}: {metric} (%)" if metric == "accuracy" else f"{column.task}: {metric} (× 100)"
    accuracy = metric_title(table.primary) == "accuracy, %"
    if column.id == "avg":
        return "average accuracy (%)" if accuracy else "average over tasks (× 100)"
    return "normalized accuracy (%)" if accuracy else "normalized average (× 100)"


def _reference_lines(ax: Any, table: Table, column: Column, horizontal: bool = True) -> None:
    for r, style in zip(table.references[:2], ("--", ":")):
        value = column.stat(r).mean
        if value is not None:
            ax.axhline(100 * value, color="0.35", linestyle=style, linewidth=1, label=r.name)


def _err(stat: Any, scale: float = 100.0) -> float:
    return 0.0 if stat.std is None else scale * stat.std


def tasks_figure(results: Sequence[CellResult], out: str | Path, *, methods: Sequence[str] | None = None,
                 modelpool: str | None = None, taskpool: str | None = None) -> list[Path]:
    """Grouped bars: per task (and the average), each chosen configuration's score with seed error bars, beside
    the pretrained model and the experts. Without `methods`, the best configurations by average."""
    out = _check_out(out)
    tables = _tables(results, modelpool, taskpool)
    wanted = _chosen(tables, methods)
    plt = _pyplot()
    written = []
    drawn = [t for t in tables if any(wanted is None or r.method in wanted for r in t.methods)]
    for table in drawn:
        rows = [r for r in table.methods if wanted is None or r.method in wanted]
        if wanted is None:
            rows = rows[:MAX_BARS]
        rows = table.references + rows
        columns = [_score_column(table, t) for t in table.tasks] + [_score_column(table, "avg")]
        width = 0.8 / len(rows)
        fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 1.0 + 0.6 * len(columns) + 0.12 * len(rows) * len(columns))),
                                        4.6))
        greys = {0: "0.75", 1: "0.45"}
        colors = iter(distinct_colors(len(rows) - len(table.references)))
        for k, r in enumerate(rows):
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(columns))]
            means = [100 * (c.stat(r).mean or 0.0) for c in columns]
            errs = [_err(c.stat(r)) for c in columns]
            ref = r.kind == "reference"
            ax.bar(xs, means, width=width * 0.92, yerr=errs if any(errs) else None, capsize=2,
                   label=r.label(), color=greys.get(k, "0.6") if ref else next(colors),
                   edgecolor="0.2" if ref else None,
                   linewidth=0.5)
        ax.set_xticks(range(len(columns)), [c.header for c in columns], rotation=30, ha="right")
        values = [100 * v for r in rows for c in columns if (v := c.stat(r).mean) is not None]
        if values:
            low, high = min(values), max(values)
            bottom = low - 0.15 * (high - low) - 5
            ax.set_ylim(max(0.0, bottom) if low >= 0 else bottom, high + 0.08 * (high - low) + 2)
        title = metric_title(table.primary)
        ax.set_ylabel("accuracy (%)" if title == "accuracy, %" else f"score ({title})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(rows) > 5 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title(fitted_title(f"{table.modelpool} on {table.taskpool}: per-task scores",
                                  0.75 * fig.get_figwidth()), fontsize=10)
        fig.tight_layout()
        written.append(_save(plt, fig, out, (table.modelpool, table.taskpool),
                             [(t.modelpool, t.taskpool) for t in drawn]))
    _say_where(out, written)
    return written


def time_figure(results: Sequence[CellResult], out: str | Path, *, methods: Sequence[str] | None = None,
                modelpool: str | None = None, taskpool: str | None = None, score: str = "avg") -> list[Path]:
    """A score against merge time (seconds, log scale when they span more than a factor of 20), one point per
    configuration with seed error bars on both axes; the reference rows as horizontal lines."""
    out = _check_out(out)
    tables = _tables(results, modelpool, taskpool)
    wanted = _chosen(tables, methods)
    plt = _pyplot()
    drawn = []
    for table in tables:
        rows = [r for r in table.methods if (wanted is None or r.method in wanted) and r.merge_seconds.mean is not None]
        if rows:
            drawn.append((table, rows))
    if not drawn:
        raise MergebenchError("no stored method result has a merge time to plot")
    written = []
    for table, rows in drawn:
        column = _score_column(table, score)
        fig, ax = plt.subplots(figsize=(7.2, 4.8))
        for k, r in enumerate(rows):
            stat = column.stat(r)
            if stat.mean is None:
                continue
            ax.errorbar([r.merge_seconds.mean], [100 * stat.mean], xerr=[_err(r.merge_seconds, 1.0)],
                        yerr=[_err(stat)], fmt=MARKERS[(k // 10) % len(MARKERS)], markersize=5, capsize=2,
                        label=r.label())
            if len(rows) <= ANNOTATE_AT_MOST:
                ax.annotate(r.label(), (r.merge_seconds.mean, 100 * stat.mean), fontsize=6, xytext=(4, 3),
                            textcoords="offset points")
        _reference_lines(ax, table, column)
        times = [r.merge_seconds.mean for r in rows if r.merge_seconds.mean]
        if times and min(times) > 0 and max(times) / min(times) > 20:
            ax.set_xscale("log")
        ax.set_xlabel("merge time (s)")
        ax.set_ylabel(_axis_label(table, column))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title(fitted_title(f"{table.modelpool} on {table.taskpool}: score against merge time",
                                  0.7 * fig.get_figwidth()), fontsize=10)
        fig.tight_layout()
        written.append(_save(plt, fig, out, (table.modelpool, table.taskpool),
                             [(t.modelpool, t.taskpool) for t, *_ in drawn]))
    _say_where(out, written)
    return written


def _varying(rows: Sequence[Row]) -> list[str]:
    by_method: dict[str, list[Row]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    names: list[str] = []
    for mine in by_method.values():
        keys = dict.fromkeys(k for r in mine for k in r.params)
        names += [k for k in keys if len({short_value(r.params.get(k)) for r in mine}) > 1 and k not in names]
    return names


def sweep_figure(results: Sequence[CellResult], out: str | Path, *, param: str | None = None,
                 methods: Sequence[str] | None = None, modelpool: str | None = None, taskpool: str | None = None,
                 score: str = "avg") -> list[Path]:
    """A score against the values of one parameter: a line per method (and per setting of its other parameters,
    preference and limit), each point the mean over seeds with the sample standard deviation as error bar. Without
    `param`, the one parameter that varies (an error names the candidates when several do)."""
    out = _check_out(out)
    tables = _tables(results, modelpool, taskpool)
    wanted = _chosen(tables, methods)
    candidates = _varying([r for t in tables for r in t.methods if wanted is None or r.method in wanted])
    if param is None:
        if len(candidates) != 1:
            raise MergebenchError("name the swept parameter with --param: " + (
                f"several vary ({', '.join(candidates)})" if candidates else
                "no parameter takes more than one value among the stored results (run a sweep first, e.g. "
                "`mergebench run -m task_arithmetic method.scaling_factor=0.1,0.3,0.5 --seed 0,1,2`)"))
        param = candidates[0]
    param = param.split(".", 1)[1] if "." in param else param
    plt = _pyplot()
    drawn = []
    for table in tables:
        lines: dict[tuple, list[Row]] = {}
        for r in table.methods:
            if (wanted is not None and r.method not in wanted) or param not in r.params:
                continue
            rest = {k: v for k, v in r.params.items() if k != param}
            key = (r.method, short_value(rest), short_value(r.preference), r.eval_limit)
            lines.setdefault(key, []).append(r)
        lines = {k: v for k, v in lines.items() if len({short_value(r.params[param]) for r in v}) > 1}
        if lines:
            drawn.append((table, lines))
    if not drawn:
        raise MergebenchError(f"no stored method was run at two or more values of {param!r}" +
                              (f"; parameters that vary: {', '.join(candidates)}" if candidates else ""))
    written = []
    for table, lines in drawn:
        column = _score_column(table, score)
        values = [r.params[param] for rows in lines.values() for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = list(dict.fromkeys(short_value(v) for v in values))
        fig, ax = plt.subplots(figsize=(7.2, 4.6))
        for rows in lines.values():
            rows = sorted(rows, key=lambda r: r.params[param] if numeric else categories.index(
                short_value(r.params[param])))
            xs = [r.params[param] if numeric else categories.index(short_value(r.params[param])) for r in rows]
            ys = [100 * (column.stat(r).mean or 0.0) for r in rows]
            errs = [_err(column.stat(r)) for r in rows]
            first = rows[0]
            settings = [s for s in first.settings if not s.startswith(f"{param}=")]
            label = first.name + first.mark + (f" ({', '.join(settings)})" if settings else "")
            ns = sorted({r.n for r in rows})
            label += f", n={ns[0]}" if len(ns) == 1 else f", n={ns[0]}–{ns[-1]}"
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", markersize=4, capsize=3, label=label)
        _reference_lines(ax, table, column)
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_xlabel(param)
        ax.set_ylabel(_axis_label(table, column))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(fitted_title(f"{table.modelpool} on {table.taskpool}: sweep over {param} (mean ± std over "
                                  "seeds)", 0.9 * fig.get_figwidth()), fontsize=10)
        fig.tight_layout()
        written.append(_save(plt, fig, out, (table.modelpool, table.taskpool),
                             [(t.modelpool, t.taskpool) for t, *_ in drawn]))
    _say_where(out, written)
    return written


def _curve_label(method: str, params: Any, several: bool) -> str:
    if not several or not params:
        return method
    shown = ", ".join(f"{k}={v}" for k, v in (params if isinstance(params, tuple) else ()))
    return f"{method} ({shown})" if shown else method


def continual_figure(results: Sequence[CellResult], out: str | Path, *, methods: Sequence[str] | None = None,
                     modelpool: str | None = None, taskpool: str | None = None) -> list[Path]:
    """One figure per pool of continual results: x = tasks seen, y = the mean score on them (%), one line per method
    configuration averaged over task orders and seeds (a band of ± one standard deviation where there are several),
    and the experts' mean over all tasks dashed: what a merge of every expert would ideally reach at the last step."""
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
            label = _curve_label(method, params, len(per_method) < len(configs)) + f"  (n={len(rows)})"
            ax.plot(xs, [100 * m for m in means], marker="o", color=color, label=label)
            if len(rows) > 1:
                ax.fill_between(xs, [100 * (m - s) for m, s in zip(means, stds)],
                                [100 * (m + s) for m, s in zip(means, stds)], color=color, alpha=0.18)
        _experts_line(ax, results, pool)
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


def _experts_line(ax: Any, results: Sequence[CellResult], pool: tuple[str, str]) -> None:
    """The experts' mean over all tasks, as a dashed line: what a merge at the last step would ideally reach."""
    for r in results:
        if (r.kind, r.method, r.modelpool, r.taskpool, r.status) == ("reference", "individual", *pool, "ok") \
                and r.mean is not None:
            ax.axhline(100 * r.mean, color="0.35", linestyle="--", linewidth=1, label="experts (all tasks)")
            return
