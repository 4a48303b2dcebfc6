"""Leaderboard tables from stored results: one table per (model pool, task pool), ready to paste into a paper.

Every row names its configuration. A method row's label is the method's name with, in parentheses, every parameter
whose stored value differs from the method's own default (the installed method's `Params()`; for a method that is
not installed, the parameters that vary between its rows in the table), its preference, an evaluation limit, and a
seed when one seed other than 0 was run. The full parameters travel in the CSV and JSON columns and the HTML detail
view.

Cells that differ only by seed are one row: each number is the mean over the seeds, shown as ``mean ± std`` (the
sample standard deviation) with the number of seeds in an ``n`` column; ``per_seed=True`` gives one row per seed
instead. When the store holds several cells for the same configuration and seed, the newest is used.

Formats: ``github`` (Markdown), ``latex`` (booktabs), ``html`` (one self-contained page, see `html_report`), ``csv``
(one file, one row per configuration, separate identity columns) and ``json`` (a list of rows, raw units).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tabulate import tabulate

from mergebench_core.errors import MergebenchError
from mergebench_core.data.evaluation import primary_value
from mergebench_core.results.store import CellResult

FORMATS = ("github", "latex", "html", "csv", "json")
REFERENCE_LABELS = {"pretrained": "Pretrained", "individual": "Individual (experts)"}
TASK_SPECIFIC_MARK = "†"
TASK_SPECIFIC_NOTE = "one model per task (not a single static merge)"
LABEL_VALUE_WIDTH = 24
"""Parameter values longer than this are shortened in labels (with …); CSV, JSON and HTML details keep them whole."""

Defaults = Callable[[str], "dict[str, Any] | None"]


def reference_label(method: str) -> str:
    return REFERENCE_LABELS.get(method, method[0].upper() + method[1:] if method else method)


def preference_label(preference: Sequence[float] | None) -> str:
    return "" if preference is None else "r=(" + ", ".join(f"{v:.3g}" for v in preference) + ")"


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def installed_defaults(method: str) -> dict[str, Any] | None:
    """The installed method's default parameters (`Params()`), or None when it is not installed or has no defaults."""
    try:
        from mergebench_core.contract.registry import get_registry

        reg = get_registry().methods.get(method)
        if reg is None:
            return None
        return asdict(reg.obj.Params())
    except (TypeError, ValueError):  # Params with required fields, or that refuse defaults: show what varies
        return None


def short_value(value: Any) -> str:
    """A parameter value as a label shows it: 0.1, 1e-05, mean, [0.2,0.8], none."""
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
        return "none" if value is None else text
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= LABEL_VALUE_WIDTH else text[:LABEL_VALUE_WIDTH - 1] + "…"


# --- numbers ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """A value over seeds: the mean, the sample standard deviation (None for fewer than two values) and the count."""

    mean: float | None = None
    std: float | None = None
    n: int = 0

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return cls()
        return cls(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))

    def as_dict(self) -> dict[str, float | None]:
        return {"mean": self.mean, "std": self.std}


# --- rows and tables -------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One configuration (method, parameters, preference, limit) on one pool: its cells, one per seed, summarised."""

    kind: str
    method: str
    params: dict[str, Any]
    preference: list[float] | None
    eval_limit: int | None
    task_specific: bool
    cells: list[CellResult]
    scores: dict[str, Stat] = field(default_factory=dict)
    metrics: dict[str, dict[str, Stat]] = field(default_factory=dict)
    mean: Stat = field(default_factory=Stat)
    normalized_mean: Stat = field(default_factory=Stat)
    merge_seconds: Stat = field(default_factory=Stat)
    peak_memory_mb: Stat = field(default_factory=Stat)
    eval_seconds: Stat = field(default_factory=Stat)
    shown_params: dict[str, Any] = field(default_factory=dict)
    """The parameters the label shows: those that differ from the defaults (or vary, when no defaults are known)."""
    defaults: dict[str, Any] | None = None
    """The installed method's default parameters, when known."""
    superseded: bool = False
    """With history: the row's cells were replaced by newer ones of the same setting (another recipe or plugin)."""
    show_seed: bool = False
    status: str = "ok"

    @property
    def seeds(self) -> list[int]:
        return [c.seed for c in self.cells]

    @property
    def n(self) -> int:
        return len(self.cells)

    @property
    def name(self) -> str:
        return reference_label(self.method) if self.kind == "reference" else self.method

    @property
    def mark(self) -> str:
        return TASK_SPECIFIC_MARK if self.task_specific else ""

    @property
    def settings(self) -> list[str]:
        """What the label puts in parentheses: non-default parameters, preference, limit, seed."""
        parts = [f"{k}={short_value(v)}" for k, v in self.shown_params.items()]
        if self.preference is not None:
            parts.append(preference_label(self.preference))
        if self.eval_limit is not None:
            parts.append(f"limit={self.eval_limit}")
        if self.show_seed:
            parts.append("seed=" + ",".join(str(s) for s in self.seeds))
        if self.superseded:
            parts.append("superseded " + time.strftime("%Y-%m-%d %H:%M", time.gmtime(self.cells[-1].created_at)))
        return parts

    def label(self, mark: str | None = TASK_SPECIFIC_MARK) -> str:
        """`ties (k=0.1, combine=mean)`, `tall_masks†`; `mark=None` leaves the † out (CSV has a column for it)."""
        suffix = ", ".join(self.settings)
        return self.name + (mark if mark and self.task_specific else "") + (f" ({suffix})" if suffix else "")

    @property
    def versions(self) -> dict[str, str]:
        return self.cells[-1].versions if self.cells else {}


@dataclass(frozen=True)
class Column:
    """A numeric table column."""

    id: str  # a task name, or avg, norm, merge, mem, eval
    header: str
    kind: str  # "score" (a fraction shown in %), "seconds", "memory"
    attr: str = ""  # the Row attribute holding the Stat; empty for task columns
    task: str | None = None
    higher_is_better: bool = True

    def stat(self, row: Row) -> Stat:
        if self.task is not None:
            return row.scores.get(self.task, Stat())
        return getattr(row, self.attr)

    def fmt(self, value: float | None) -> str:
        if value is None:
            return ""
        if self.kind == "score":
            return f"{100 * value:.1f}"
        if self.kind == "memory":
            return f"{value:.0f}"
        return f"{value:.2f}"

    def text(self, stat: Stat, std: bool = True) -> str:
        """`80.9`, or `80.9 ± 0.4` over several seeds."""
        if stat.mean is None:
            return ""
        if std and stat.std is not None:
            return f"{self.fmt(stat.mean)} ± {self.fmt(stat.std)}"
        return self.fmt(stat.mean)

    @property
    def csv_name(self) -> str:
        return self.task if self.task is not None else {"avg": "avg", "norm": "norm", "merge": "merge_s",
                                                        "mem": "peak_mem_mb", "eval": "eval_s"}[self.id]


SUMMARY_COLUMNS = {
    "avg": Column("avg", "Avg.", "score", "mean"),
    "norm": Column("norm", "Norm.", "score", "normalized_mean"),
    "merge": Column("merge", "Merge (s)", "seconds", "merge_seconds", higher_is_better=False),
    "mem": Column("mem", "Peak mem (MB)", "memory", "peak_memory_mb", higher_is_better=False),
    "eval": Column("eval", "Eval (s)", "seconds", "eval_seconds", higher_is_better=False),
}
DEFAULT_COLUMNS = ("tasks", "avg", "norm", "merge", "mem")
COLUMN_ALIASES = {
    "avg.": "avg", "mean": "avg", "average": "avg", "norm.": "norm", "normalized": "norm", "normalized_mean": "norm",
    "merge (s)": "merge", "merge_s": "merge", "merge_seconds": "merge", "time": "merge",
    "peak mem (mb)": "mem", "peak_mem": "mem", "peak_mem_mb": "mem", "peak_memory_mb": "mem", "memory": "mem",
    "peak": "mem", "eval (s)": "eval", "eval_s": "eval", "eval_seconds": "eval",
}


@dataclass
class Table:
    """The rows of one (model pool, task pool): reference rows first, then configurations by average, best first."""

    modelpool: str
    taskpool: str
    tasks: list[str]
    primary: dict[str, dict[str, Any]]
    references: list[Row]
    methods: list[Row]
    failed: list[CellResult]
    columns: list[Column] = field(default_factory=list)

    @property
    def rows(self) -> list[Row]:
        return self.references + self.methods

    @property
    def aggregated(self) -> bool:
        """True when some row averages several seeds (the tables then show n and ± std)."""
        return any(r.n > 1 for r in self.rows)

    @property
    def task_specific(self) -> bool:
        return any(r.task_specific for r in self.rows)

    @property
    def title(self) -> str:
        return f"{self.modelpool} on {self.taskpool} ({metric_title(self.primary)})"

    def ranks(self, column: Column) -> dict[int, int]:
        """{id(row): 1 or 2} for the best and second best method rows of a column, compared as displayed (ties share
        a rank). Reference rows are not ranked: the experts would win every task."""
        shown = {id(r): column.fmt(column.stat(r).mean) for r in self.methods}
        values = sorted({float(v) for v in shown.values() if v not in ("", "nan")},
                        reverse=column.higher_is_better)
        rank = {v: i + 1 for i, v in enumerate(values[:2])}
        return {k: rank[float(v)] for k, v in shown.items() if v not in ("", "nan") and float(v) in rank}

    def notes(self) -> list[str]:
        out = []
        if self.task_specific:
            out.append(f"{TASK_SPECIFIC_MARK} {TASK_SPECIFIC_NOTE}.")
        if self.aggregated:
            out.append("Mean ± sample standard deviation over n seeds.")
        for c in self.failed:
            label = c.method + (f" {_settings_text(c.params)}" if c.params else "") + \
                (f" seed={c.seed}" if c.seed else "")
            out.append(f"FAILED {label}: {c.error}")
        return out


def _settings_text(params: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={short_value(v)}" for k, v in params.items()) + ")"


def metric_title(primary: dict[str, dict[str, Any]]) -> str:
    """'accuracy, %' when every task is scored by accuracy, else each task's primary metric."""
    others = {t: spec.get("metric", "accuracy") for t, spec in primary.items()
              if spec.get("metric", "accuracy") != "accuracy"}
    if not others:
        return "accuracy, %"
    return "× 100; accuracy except " + ", ".join(f"{t}: {m}" for t, m in others.items())


def group(results: Sequence[CellResult]) -> dict[tuple[str, str], list[CellResult]]:
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for r in results:
        groups.setdefault((r.modelpool, r.taskpool), []).append(r)
    return groups


def task_order(rows: Sequence[CellResult]) -> list[str]:
    """Tasks in the order the pool gave them (the experts' row keeps it), then any others."""
    order: list[str] = []
    for r in sorted(rows, key=lambda r: r.method != "individual"):
        for t in r.metrics:
            if t not in order:
                order.append(t)
    return order


def _config_key(c: CellResult, history: bool = False) -> tuple:
    key = (c.kind, c.method, _canon(c.params), _canon(c.preference), c.eval_limit, c.task_specific)
    return key + (_canon(getattr(c, "identity", None) or {}),) if history else key


def _newest_per_seed(cells: Sequence[CellResult]) -> list[CellResult]:
    """One cell per (configuration, seed): the newest, so a rerun or a newer version replaces the older cell."""
    newest: dict[tuple, CellResult] = {}
    for c in cells:
        key = (*_config_key(c), c.seed)
        if key not in newest or c.created_at >= newest[key].created_at:
            newest[key] = c
    return list(newest.values())


def _summarise(row: Row, tasks: Sequence[str], primary: dict[str, dict[str, Any]]) -> Row:
    cells = row.cells
    row.scores = {t: Stat.of(primary_value(c.metrics, c.primary_metrics or primary, t) for c in cells)
                  for t in tasks}
    names = list(dict.fromkeys(m for c in cells for t in tasks for m in c.metrics.get(t, {})))
    row.metrics = {t: {m: Stat.of(c.metrics.get(t, {}).get(m) for c in cells) for m in names
                       if any(m in c.metrics.get(t, {}) for c in cells)} for t in tasks}
    for attr in ("mean", "normalized_mean", "merge_seconds", "peak_memory_mb", "eval_seconds"):
        setattr(row, attr, Stat.of(getattr(c, attr) for c in cells))
    return row


def _label_params(rows: list[Row], defaults: Defaults) -> None:
    """Fill `shown_params`: non-default parameters, or (method not installed) those varying between its rows."""
    by_method: dict[str, list[Row]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    for name, mine in by_method.items():
        known = defaults(name)
        if known is not None:
            for r in mine:
                r.defaults = known
                r.shown_params = {k: v for k, v in r.params.items()
                                  if k not in known or _canon(v) != _canon(known[k])}
            continue
        keys = list(dict.fromkeys(k for r in mine for k in r.params))
        varying = [k for k in keys if len({_canon(r.params.get(k)) for r in mine}) > 1]
        for r in mine:
            r.shown_params = {k: r.params[k] for k in varying if k in r.params}


def build_tables(results: Sequence[CellResult], *, per_seed: bool = False, columns: str | Sequence[str] | None = None,
                 defaults: Defaults | None = None, history: bool = False) -> list[Table]:
    """The tables `render` prints, as data: one per (model pool, task pool), in the order the pools first appear.
    With `history`, cells of an older identity (pool recipe, plugin version) are rows of their own, marked
    superseded, instead of being dropped."""
    defaults = defaults or installed_defaults
    tables = []
    for (modelpool, taskpool), cells in group(results).items():
        if not history:
            cells = _newest_per_seed(cells)
        ok = [c for c in cells if c.status == "ok"]
        failed = [c for c in cells if c.status != "ok"]
        tasks = task_order(ok)
        primary: dict[str, dict[str, Any]] = {}
        for c in ok:
            for t, spec in c.primary_metrics.items():
                primary.setdefault(t, spec)
        grouped: dict[tuple, list[CellResult]] = {}
        for c in sorted(ok, key=lambda c: (c.seed, c.created_at)):
            key = _config_key(c, history) + ((c.seed, c.created_at) if per_seed else ())
            grouped.setdefault(key, []).append(c)
        latest: dict[tuple, float] = {}
        for c in ok:
            latest[_config_key(c)] = max(latest.get(_config_key(c), 0.0), c.created_at)
        rows = [_summarise(Row(c[0].kind, c[0].method, dict(c[0].params), c[0].preference, c[0].eval_limit,
                               c[0].task_specific, c), tasks, primary) for c in grouped.values()]
        for r in rows:  # with history, a row none of whose cells is its setting's newest was superseded
            r.superseded = history and all(c.created_at < latest[_config_key(c)] for c in r.cells)
        refs = [r for r in rows if r.kind == "reference"]
        methods = [r for r in rows if r.kind != "reference"]
        _label_params(methods, defaults)
        seeds_of: dict[tuple, set[int]] = {}
        for r in methods:
            seeds_of.setdefault(_config_key(r.cells[0]), set()).update(r.seeds)
        for r in methods:
            all_seeds = seeds_of[_config_key(r.cells[0])]
            r.show_seed = (per_seed and len(all_seeds) > 1) or (r.n == 1 and r.seeds != [0] and len(all_seeds) == 1)
        refs.sort(key=lambda r: (list(REFERENCE_LABELS).index(r.method) if r.method in REFERENCE_LABELS else 99,
                                 r.method))
        methods.sort(key=lambda r: (-(r.mean.mean if r.mean.mean is not None and not math.isnan(r.mean.mean)
                                      else -math.inf), r.label()))
        table = Table(modelpool, taskpool, tasks, {t: primary.get(t, {"metric": "accuracy", "higher_is_better": True})
                                                   for t in tasks}, refs, methods, failed)
        tables.append(table)
    choose_columns(tables, columns)
    return tables


def _task_column(table: Table, task: str) -> Column:
    spec = table.primary.get(task, {})
    return Column(task, task, "score", task=task, higher_is_better=bool(spec.get("higher_is_better", True)))


def column_names(tables: Sequence[Table]) -> list[str]:
    """What `--columns` accepts: tasks, each task's name, avg, norm, merge, mem, eval."""
    return ["tasks", *dict.fromkeys(t for tb in tables for t in tb.tasks), *SUMMARY_COLUMNS]


def choose_columns(tables: Sequence[Table], spec: str | Sequence[str] | None) -> None:
    """Set each table's columns from a `--columns` value: a list (`tasks,avg,norm`), or removals from the default
    (`-merge,-mem`). Names: `tasks` (every task), a task's name, `avg`, `norm`, `merge`, `mem`, `eval`; headers such
    as `Avg.` or `Merge (s)` work too. An unknown name is an error that lists the known ones."""
    items = _split_spec(spec)
    all_tasks = {t for tb in tables for t in tb.tasks}
    removals = [i for i in items if i.startswith("-")]
    if removals and len(removals) != len(items):
        raise MergebenchError(f"--columns {','.join(items)}: either list the columns you want or only removals "
                              "(-merge,-mem), not both")
    wanted = [i[1:] for i in removals] if removals else items

    def resolve(name: str) -> str:
        key = name.strip()
        if key in all_tasks or key == "tasks":
            return key
        low = key.lower()
        low = COLUMN_ALIASES.get(low, low)
        if low in SUMMARY_COLUMNS or low == "tasks":
            return low
        known = column_names(tables)
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise MergebenchError(f"unknown column {name!r}.{hint} Columns: {', '.join(known)}")

    resolved = [resolve(w) for w in wanted]
    if removals:
        chosen = [n for n in DEFAULT_COLUMNS if n not in resolved]
        dropped_tasks = set(resolved) & all_tasks
    else:
        chosen = resolved or list(DEFAULT_COLUMNS)
        dropped_tasks = set()
    for table in tables:
        cols: list[Column] = []
        for name in chosen:
            if name == "tasks":
                cols += [_task_column(table, t) for t in table.tasks if t not in dropped_tasks]
            elif name in SUMMARY_COLUMNS:
                cols.append(SUMMARY_COLUMNS[name])
            elif name in table.tasks:
                cols.append(_task_column(table, name))
        seen: set[str] = set()
        table.columns = [c for c in cols if not (c.id in seen or seen.add(c.id))]  # type: ignore[func-returns-value]


def _split_spec(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None:
        return []
    items = [spec] if isinstance(spec, str) else list(spec)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


# --- text formats ----------------------------------------------------------------------------------------------------
def table_body(table: Table, label: Callable[[Row], str] = Row.label) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of a table, as the github format prints them."""
    headers = ["Method", *(["n"] if table.aggregated else []), *(c.header for c in table.columns)]
    body = []
    for r in table.rows:
        body.append([label(r), *([str(r.n)] if table.aggregated else []),
                     *(c.text(c.stat(r)) for c in table.columns)])
    return headers, body


def _github(table: Table) -> str:
    headers, body = table_body(table)
    text = tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)
    notes = table.notes()
    return "\n".join([f"### {table.title}", "", text, *([""] + notes if notes else [])])


def _csv(tables: Sequence[Table]) -> str:
    """One CSV for every table: identity columns (method, parameters, preference, seeds) apart from the label, then
    each chosen column's mean and std (scores in %, like the tables)."""
    names: list[str] = []
    cols: dict[str, Column] = {}
    for tb in tables:
        for c in tb.columns:
            if c.csv_name not in cols:
                cols[c.csv_name] = c
                names.append(c.csv_name)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["modelpool", "taskpool", "kind", "method", "label", "task_specific", "params",
                     "non_default_params", "preference", "eval_limit", "seeds", "n",
                     *(x for n in names for x in (n, f"{n}_std")), "status", "error"])

    def num(column: Column, value: float | None) -> str:
        if value is None:
            return ""
        return f"{value * 100:.6g}" if column.kind == "score" else f"{value:.6g}"

    for tb in tables:
        by_name = {c.csv_name: c for c in tb.columns}
        for r in tb.rows:
            values = []
            for n in names:
                c = by_name.get(n)
                stat = c.stat(r) if c else Stat()
                values += [num(cols[n], stat.mean), num(cols[n], stat.std)]
            writer.writerow([tb.modelpool, tb.taskpool, r.kind, r.method, r.label(mark=None), int(r.task_specific),
                             json.dumps(r.params, default=str), json.dumps(r.shown_params, default=str),
                             json.dumps(r.preference) if r.preference is not None else "",
                             "" if r.eval_limit is None else r.eval_limit, " ".join(map(str, r.seeds)), r.n,
                             *values, "ok", ""])
        for c in tb.failed:
            writer.writerow([tb.modelpool, tb.taskpool, c.kind, c.method, c.method, int(c.task_specific),
                             json.dumps(c.params, default=str), "",
                             json.dumps(c.preference) if c.preference is not None else "",
                             "" if c.eval_limit is None else c.eval_limit, c.seed, 1, *([""] * 2 * len(names)),
                             c.status, c.error or ""])
    return buf.getvalue().rstrip("\n")


def row_json(table: Table, r: Row) -> dict[str, Any]:
    """A row as data, in raw units (fractions, seconds, MB): means and sample stds over its seeds, and its cells."""
    return {
        "modelpool": table.modelpool, "taskpool": table.taskpool, "kind": r.kind, "method": r.method,
        "label": r.label(), "task_specific": r.task_specific, "params": r.params,
        "non_default_params": r.shown_params, "preference": r.preference, "eval_limit": r.eval_limit,
        "seeds": r.seeds, "n": r.n, "status": "ok", "error": None,
        "scores": {t: {**table.primary.get(t, {}), **r.scores[t].as_dict()} for t in table.tasks},
        "metrics": {t: {m: s.as_dict() for m, s in ms.items()} for t, ms in r.metrics.items()},
        "avg": r.mean.as_dict(), "norm": r.normalized_mean.as_dict(), "merge_seconds": r.merge_seconds.as_dict(),
        "peak_memory_mb": r.peak_memory_mb.as_dict(), "eval_seconds": r.eval_seconds.as_dict(),
        "cells": [{"cell_key": c.cell_key, "seed": c.seed, "created_at": c.created_at, "versions": c.versions,
                   "extras": c.extras} for c in r.cells],
    }


def _json(tables: Sequence[Table]) -> str:
    out = []
    for tb in tables:
        out += [row_json(tb, r) for r in tb.rows]
        out += [{"modelpool": c.modelpool, "taskpool": c.taskpool, "kind": c.kind, "method": c.method,
                 "label": c.method, "task_specific": c.task_specific, "params": c.params, "preference": c.preference,
                 "eval_limit": c.eval_limit, "seeds": [c.seed], "n": 1, "status": c.status, "error": c.error,
                 "cells": [{"cell_key": c.cell_key, "seed": c.seed, "created_at": c.created_at,
                            "versions": c.versions, "extras": c.extras}]} for c in tb.failed]
    return json.dumps(out, indent=2, default=str)


# --- LaTeX -----------------------------------------------------------------------------------------------------------
_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                   "±": r"$\pm$", "×": r"$\times$", "…": r"\ldots{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def _latex_label(r: Row) -> str:
    text = latex_escape(r.name) + (r"$^\dagger$" if r.task_specific else "")
    settings = r.settings
    return text + (f" ({latex_escape(', '.join(settings))})" if settings else "")


def _latex(table: Table) -> str:
    """A booktabs table: numbers right-aligned (with ± std in a left-aligned companion column when seeds were
    aggregated), a rule after the reference rows, the best method bold and the second underlined per column."""
    cols = table.columns
    stds = {c.id: any(c.stat(r).std is not None for r in table.rows) for c in cols}
    spec = "l" + ("r" if table.aggregated else "") + "".join("r@{}l" if stds[c.id] else "r" for c in cols)
    header = ["Method", *([r"$n$"] if table.aggregated else []),
              *((rf"\multicolumn{{2}}{{c}}{{{latex_escape(c.header)}}}" if stds[c.id] else latex_escape(c.header))
                for c in cols)]
    ranks = {c.id: table.ranks(c) for c in cols}

    def line(r: Row) -> str:
        cells = [_latex_label(r), *([str(r.n)] if table.aggregated else [])]
        for c in cols:
            stat = c.stat(r)
            value = c.fmt(stat.mean)
            rank = ranks[c.id].get(id(r)) if r.kind != "reference" else None
            if value and rank == 1:
                value = rf"\textbf{{{value}}}"
            elif value and rank == 2:
                value = rf"\underline{{{value}}}"
            cells.append(value)
            if stds[c.id]:
                cells.append(rf"${{}}\pm{{}}${c.fmt(stat.std)}" if stat.std is not None else "")
        return " & ".join(cells) + r" \\"

    caption = latex_escape(table.title) + r". Best method in \textbf{bold}, second \underline{underlined}"
    if table.aggregated:
        caption += r"; mean $\pm$ sample standard deviation over $n$ seeds"
    lines = [f"% {table.title}", r"% needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{caption}.}}",
             rf"\label{{tab:{_latex_key(table.modelpool)}-{_latex_key(table.taskpool)}}}",
             r"\setlength{\tabcolsep}{4pt}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(header) + r" \\",
             r"\midrule"]
    lines += [line(r) for r in table.references]
    if table.references and table.methods:
        lines.append(r"\midrule")
    lines += [line(r) for r in table.methods]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.task_specific:
        note = TASK_SPECIFIC_NOTE[0].upper() + TASK_SPECIFIC_NOTE[1:]
        lines += [r"\par\smallskip", rf"{{\footnotesize $^\dagger$\,{note}.\par}}"]
    lines.append(r"\end{table}")
    lines += [f"% FAILED {c.method} {_settings_text(c.params) if c.params else ''} seed={c.seed}: "
              f"{(c.error or '').splitlines()[0] if c.error else ''}" for c in table.failed]
    return "\n".join(lines)


def _latex_key(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in name)


# --- entry point -----------------------------------------------------------------------------------------------------
def render(results: Sequence[CellResult], fmt: str = "github", *, columns: str | Sequence[str] | None = None,
           per_seed: bool = False, history: bool = False, defaults: Defaults | None = None) -> str:
    """Tables of `results` in `fmt`; `columns` as `--columns` takes them; `per_seed` gives one row per seed;
    `history` keeps superseded cells as rows of their own (see `build_tables`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    tables = build_tables(results, per_seed=per_seed, columns=columns, defaults=defaults, history=history)
    if fmt == "json":
        return _json(tables)
    if fmt == "csv":
        return _csv(tables)
    if fmt == "html":
        from mergebench_core.results.html_report import render_html

        return render_html(tables)
    if fmt == "latex":
        return "\n\n".join(_latex(t) for t in tables)
    return "\n\n".join(_github(t) for t in tables)
