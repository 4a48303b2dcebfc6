"""What a leaderboard table is made of: values over seeds (`Stat`), configurations (`Row`), numeric columns
(`Column`) and the table of one (model pool, task pool) (`Table`), with the rule that marks the best values.

Every output format (Markdown, LaTeX, HTML, CSV, JSON) and the figures read these, so what a cell shows, which rows
are ranked and how ties are marked is decided once, here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mergebench_core.results.labels import (
    TASK_SPECIFIC_MARK,
    TASK_SPECIFIC_NOTE,
    preference_label,
    reference_label,
    settings_text,
    short_value,
)
from mergebench_core.results.store import CellResult

SCORE = "score"
"""The kind of column whose best values are marked by default (a task, the average, the normalised average)."""


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
    params_ratio: Stat = field(default_factory=Stat)
    """Upscaled models: parameters held against the pretrained model's (`params ×`); empty for other rows."""
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
        if self.kind == SCORE:
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
                                                        "mem": "peak_mem_mb", "eval": "eval_s",
                                                        "params": "params_x"}[self.id]


SUMMARY_COLUMNS = {
    "avg": Column("avg", "Avg.", SCORE, "mean"),
    "norm": Column("norm", "Norm.", SCORE, "normalized_mean"),
    "merge": Column("merge", "Merge (s)", "seconds", "merge_seconds", higher_is_better=False),
    "mem": Column("mem", "Peak mem (MB)", "memory", "peak_memory_mb", higher_is_better=False),
    "eval": Column("eval", "Eval (s)", "seconds", "eval_seconds", higher_is_better=False),
    "params": Column("params", "Params ×", "ratio", "params_ratio", higher_is_better=False),
}
OPTIONAL_COLUMNS = ("params",)
"""Default columns shown only in tables where some row has a value (upscaled models' `params ×`)."""
DEFAULT_COLUMNS = ("tasks", "avg", "norm", "merge", "mem")
COLUMN_ALIASES = {
    "avg.": "avg", "mean": "avg", "average": "avg", "norm.": "norm", "normalized": "norm", "normalized_mean": "norm",
    "merge (s)": "merge", "merge_s": "merge", "merge_seconds": "merge", "time": "merge",
    "peak mem (mb)": "mem", "peak_mem": "mem", "peak_mem_mb": "mem", "peak_memory_mb": "mem", "memory": "mem",
    "peak": "mem", "eval (s)": "eval", "eval_s": "eval", "eval_seconds": "eval",
    "params ×": "params", "params_x": "params", "params_ratio": "params", "parameters": "params",
}


def metric_title(primary: dict[str, dict[str, Any]]) -> str:
    """'accuracy, %' when every task is scored by accuracy, else each task's primary metric."""
    others = {t: spec.get("metric", "accuracy") for t, spec in primary.items()
              if spec.get("metric", "accuracy") != "accuracy"}
    if not others:
        return "accuracy, %"
    return "× 100; accuracy except " + ", ".join(f"{t}: {m}" for t, m in others.items())


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
    mark_costs: bool = False
    """Also mark the best and second merge time, memory and evaluation time (by default only scores are marked:
    a cost shared by most rows, such as 3 MB, would make half the column bold)."""

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
        """{id(row): 1 or 2} for the best and second method rows of `column`, compared as displayed. A row's rank is
        one more than the number of rows shown strictly better, so tied rows share a rank: every tied best row is
        first, and after two tied best rows the next is third, not second. Reference rows are not ranked: the
        experts would win every task."""
        shown = {id(r): column.fmt(column.stat(r).mean) for r in self.methods}
        sign = -1.0 if column.higher_is_better else 1.0
        keys = {k: sign * float(v) for k, v in shown.items() if v not in ("", "nan")}
        ranks = {k: 1 + sum(1 for other in keys.values() if other < key) for k, key in keys.items()}
        return {k: rank for k, rank in ranks.items() if rank <= 2}

    def marks(self, column: Column) -> dict[int, int]:
        """`ranks(column)` where the column is marked: score columns always, cost columns only with `mark_costs`."""
        return self.ranks(column) if column.kind == SCORE or self.mark_costs else {}

    def notes(self) -> list[str]:
        out = []
        if self.task_specific:
            out.append(f"{TASK_SPECIFIC_MARK} {TASK_SPECIFIC_NOTE}.")
        if self.aggregated:
            out.append("Mean ± sample standard deviation over n seeds." if not any(
                c.task_order for r in self.methods for c in r.cells) else
                "Mean ± sample standard deviation over n seeds and task orders (continual methods).")
        for c in self.failed:
            label = c.method + (f" {settings_text(c.params)}" if c.params else "") + \
                (f" seed={c.seed}" if c.seed else "")
            out.append(f"FAILED {label}: {c.error}")
        return out

