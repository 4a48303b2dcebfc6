"""Leaderboard tables from stored results: one table per (model pool, task pool), ready to paste into a paper."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict

from tabulate import tabulate

from .evaluation import primary_value
from .store import CellResult

FORMATS = ("github", "latex", "html", "csv", "json")
_TABULATE = {"github": "github", "latex": "latex_booktabs", "html": "html"}
REFERENCE_LABELS = {"pretrained": "Pretrained", "individual": "Individual (experts)"}


def reference_label(method: str) -> str:
    return REFERENCE_LABELS.get(method, method[0].upper() + method[1:] if method else method)


def preference_label(preference: Sequence[float] | None) -> str:
    return "" if preference is None else "r=(" + ", ".join(f"{v:.3g}" for v in preference) + ")"
TASK_SPECIFIC_MARK = "†"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


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


def method_labels(rows: Sequence[CellResult]) -> dict[int, str]:
    """A label per method row: its name, plus the parameters (and seed) that vary between its rows."""
    by_method: dict[str, list[CellResult]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    labels = {}
    for name, group_rows in by_method.items():
        settings = [dict(r.params, seed=r.seed) for r in group_rows]
        varying = [k for k in settings[0] if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
        for r, s in zip(group_rows, settings):
            suffix = ", ".join([f"{k}={s[k]}" for k in varying] + ([preference_label(r.preference)]
                                                                   if r.preference is not None else []))
            mark = TASK_SPECIFIC_MARK if r.task_specific else ""
            labels[id(r)] = f"{name}{mark}" + (f" ({suffix})" if suffix else "")
    return labels


def table_rows(rows: Sequence[CellResult]) -> tuple[list[str], list[list[str]], list[CellResult]]:
    """Headers, formatted rows (references first, then methods by average, best first), and the failed cells."""
    tasks = task_order([r for r in rows if r.status == "ok"])
    ok = [r for r in rows if r.status == "ok"]
    failed = [r for r in rows if r.status != "ok"]
    refs = sorted((r for r in ok if r.kind == "reference"), key=lambda r: (list(REFERENCE_LABELS).index(r.method)
                  if r.method in REFERENCE_LABELS else 99, r.method))
    methods = sorted((r for r in ok if r.kind != "reference"), key=lambda r: -(r.mean or 0.0))
    labels = method_labels(methods)
    headers = ["Method", *tasks, "Avg.", "Norm.", "Merge (s)", "Peak mem (MB)"]
    body = []
    for r in refs + methods:
        label = reference_label(r.method) if r.kind == "reference" else labels[id(r)]
        cells = [_pct(primary_value(r.metrics, r.primary_metrics, t)) for t in tasks]
        body.append([label, *cells, _pct(r.mean), _pct(r.normalized_mean), _num(r.merge_seconds),
                     _num(r.peak_memory_mb, 0)])
    return headers, body, failed


def metric_title(rows: Sequence[CellResult]) -> str:
    """'accuracy, %' when every task is scored by accuracy, else each task's primary metric."""
    primary: dict[str, str] = {}
    for r in rows:
        for t, spec in r.primary_metrics.items():
            primary.setdefault(t, spec.get("metric", "accuracy"))
    others = {t: m for t, m in primary.items() if m != "accuracy"}
    if not others:
        return "accuracy, %"
    return "× 100; accuracy except " + ", ".join(f"{t}: {m}" for t, m in others.items())


def render(results: Sequence[CellResult], fmt: str = "github") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps([asdict(r) | {"cell_key": r.cell_key} for r in results], indent=2, default=str)
    out = []
    for (modelpool, taskpool), rows in group(results).items():
        headers, body, failed = table_rows(rows)
        if fmt == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(["modelpool", "taskpool", *headers])
            writer.writerows([modelpool, taskpool, *row] for row in body)
            out.append(buf.getvalue().rstrip("\n"))
            continue
        title = f"{modelpool} on {taskpool} ({metric_title(rows)})"
        table = tabulate(body, headers=headers, tablefmt=_TABULATE[fmt], disable_numparse=True)
        notes = []
        if any(r.task_specific for r in rows):
            notes.append(f"{TASK_SPECIFIC_MARK} one model per task (not a single static merge).")
        for r in failed:
            notes.append(f"FAILED {r.method} {r.params}: {r.error}")
        if fmt == "github":
            out.append("\n".join([f"### {title}", "", table, *([""] + notes if notes else [])]))
        elif fmt == "latex":
            out.append("\n".join([f"% {title}", table, *(f"% {n}" for n in notes)]))
        else:
            out.append("\n".join([f"<h3>{title}</h3>", table, *(f"<p>{n}</p>" for n in notes)]))
    return "\n\n".join(out)
