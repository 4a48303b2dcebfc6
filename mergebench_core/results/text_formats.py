"""The plain formats of a leaderboard: Markdown (`github`) to read, CSV and JSON to compute with.

Markdown shows what a reader compares (labels, means ± std); CSV and JSON keep what a script needs apart from the
label (method, full and non-default parameters, preference, seeds, cell keys), so nobody parses a label back.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from typing import Any

from tabulate import tabulate

from mergebench_core.results.rows import Column, Row, Stat, Table


def table_body(table: Table, label: Callable[[Row], str] = Row.label) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of a table, as the github format prints them."""
    headers = ["Method", *(["n"] if table.aggregated else []), *(c.header for c in table.columns)]
    body = []
    for r in table.rows:
        body.append([label(r), *([str(r.n)] if table.aggregated else []),
                     *(c.text(c.stat(r)) for c in table.columns)])
    return headers, body


def github_table(table: Table) -> str:
    """One table in GitHub Markdown, titled, with its notes (†, seeds, failures) below."""
    headers, body = table_body(table)
    text = tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)
    notes = table.notes()
    return "\n".join([f"### {table.title}", "", text, *([""] + notes if notes else [])])


def csv_tables(tables: Sequence[Table]) -> str:
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


def json_tables(tables: Sequence[Table]) -> str:
    """Every row of every table as one JSON list (failed cells too, with their error)."""
    out = []
    for tb in tables:
        out += [row_json(tb, r) for r in tb.rows]
        out += [{"modelpool": c.modelpool, "taskpool": c.taskpool, "kind": c.kind, "method": c.method,
                 "label": c.method, "task_specific": c.task_specific, "params": c.params, "preference": c.preference,
                 "eval_limit": c.eval_limit, "seeds": [c.seed], "n": 1, "status": c.status, "error": c.error,
                 "cells": [{"cell_key": c.cell_key, "seed": c.seed, "created_at": c.created_at,
                            "versions": c.versions, "extras": c.extras}]} for c in tb.failed]
    return json.dumps(out, indent=2, default=str)
