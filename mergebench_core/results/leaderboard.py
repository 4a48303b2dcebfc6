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

This module is the entry point (`render`); the pieces live beside it, one idea each: `labels` (how a row names its
configuration), `rows` (what a table is made of), `tables` (building tables from cells), `text_formats` (Markdown,
CSV, JSON), `latex` and `html_report`. Their public names are importable from here too, as they were when this
module held them all.
"""

from __future__ import annotations

from collections.abc import Sequence

from mergebench_core.results.html_report import render_html
from mergebench_core.results.labels import (
    LABEL_VALUE_WIDTH,
    REFERENCE_LABELS,
    TASK_SPECIFIC_MARK,
    TASK_SPECIFIC_NOTE,
    Defaults,
    installed_defaults,
    preference_label,
    reference_label,
    short_value,
)
from mergebench_core.results.latex import FLOATS, latex_escape, latex_table, latex_tables
from mergebench_core.results.rows import (
    COLUMN_ALIASES,
    DEFAULT_COLUMNS,
    SUMMARY_COLUMNS,
    Column,
    Row,
    Stat,
    Table,
    metric_title,
)
from mergebench_core.results.store import CellResult
from mergebench_core.results.tables import (
    build_tables,
    choose_columns,
    column_names,
    group,
    select_methods,
    task_column,
    task_order,
)
from mergebench_core.results.text_formats import csv_tables, github_table, json_tables, row_json, table_body

FORMATS = ("github", "latex", "html", "csv", "json")


def render(results: Sequence[CellResult], fmt: str = "github", *, columns: str | Sequence[str] | None = None,
           per_seed: bool = False, history: bool = False, defaults: Defaults | None = None,
           methods: str | Sequence[str] | None = None, mark_costs: bool = False,
           latex_float: str = "table*") -> str:
    """Tables of `results` in `fmt`; `columns` as `--columns` takes them; `per_seed` gives one row per seed;
    `history` keeps superseded cells as rows of their own; `methods` keeps only those methods' rows beside the
    references; `mark_costs` marks the best merge time and memory as well as the scores; `latex_float` is `table*`
    (both columns of a two-column paper) or `table` (see `build_tables` and `latex`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if latex_float not in FLOATS:
        raise ValueError(f"unknown LaTeX float {latex_float!r}; choose one of {', '.join(FLOATS)}")
    tables = build_tables(results, per_seed=per_seed, columns=columns, defaults=defaults, history=history,
                          methods=methods, mark_costs=mark_costs)
    if fmt == "json":
        return json_tables(tables)
    if fmt == "csv":
        return csv_tables(tables)
    if fmt == "html":
        return render_html(tables)
    if fmt == "latex":
        return latex_tables(tables, latex_float)
    return "\n\n".join(github_table(t) for t in tables)


__all__ = [
    "COLUMN_ALIASES", "DEFAULT_COLUMNS", "FLOATS", "FORMATS", "LABEL_VALUE_WIDTH", "REFERENCE_LABELS",
    "SUMMARY_COLUMNS", "TASK_SPECIFIC_MARK", "TASK_SPECIFIC_NOTE", "Column", "Defaults", "Row", "Stat", "Table",
    "build_tables", "choose_columns", "column_names", "csv_tables", "github_table", "group", "installed_defaults",
    "json_tables", "latex_escape", "latex_table", "latex_tables", "metric_title", "preference_label",
    "reference_label", "render", "render_html", "row_json", "select_methods", "short_value", "table_body",
    "task_column", "task_order",
]
