"""Pareto analysis of preference-aware results: non-dominated filtering, hypervolume, preference grids, front tables.

A *front* is every stored ok row of one method configuration — same (model pool, task pool, method, params, seed) —
across the preference vectors it was run at. Each row is a point whose objectives are the group's tasks (in the order
they first appear in the rows' metrics), scored by each task's primary metric; a metric where lower is better is
negated so that every objective is maximised.

Reference point for the hypervolume: the pretrained model's scores on the same (model pool, task pool) when a
pretrained reference row exists — so the hypervolume measures what merging gains over doing nothing — else 0 in
every objective. Points that do not beat the reference in every objective add nothing. With the zero reference, a
negated lower-is-better metric is never above 0, so such fronts get a hypervolume of 0: store the pretrained row.
Hypervolumes are in the metrics' own units (fractions, not percent), multiplied across tasks.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tabulate import tabulate

from mergebench_core.preferences.vectors import simplex_grid
from mergebench_core.results.labels import front_labels, preference_label
from mergebench_core.results.store import CellResult

log = logging.getLogger(__name__)

# `simplex_grid` makes preference vectors, so it lives in `vectors`; it is re-exported for code that imported it here
__all__ = ["FORMATS", "FrontSummary", "front_labels", "front_summaries", "hypervolume", "non_dominated",
           "render_pareto", "simplex_grid"]

FORMATS = ("github", "latex", "html", "csv", "json")
_TABULATE = {"github": "github", "latex": "latex_booktabs", "html": "html"}
_REFERENCE_TEXT = {"pretrained": "pretrained model", "zero": "zero in every objective"}


def non_dominated(points: Any, maximize: bool = True) -> np.ndarray:
    """Mask of the points no other point dominates (at least as good everywhere, strictly better somewhere).

    Exact duplicates dominate neither each other, so all copies are kept. One vectorised pass per point keeps memory
    at O(n·m), so a few thousand points are fine.
    """
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2:
        raise ValueError(f"points must be a 2-D array (n points × m objectives), got shape {pts.shape}")
    if not maximize:
        pts = -pts
    keep = np.ones(len(pts), dtype=bool)
    for i, p in enumerate(pts):
        keep[i] = not np.any(np.all(pts >= p, axis=1) & np.any(pts > p, axis=1))
    return keep


def hypervolume(points: Any, ref: Any, maximize: bool = True) -> float:
    """Exact hypervolume of `points` against `ref`, computed by moocore (a maintained C implementation).

    moocore minimises, so maximised objectives are negated. Points that do not strictly beat `ref` in every objective
    bound no volume and are dropped first; an empty set has hypervolume 0.0.
    """
    import moocore  # here, not at module level: preference parsing imports this module and needs no C library

    ref_arr = np.asarray(ref, dtype=float)
    if ref_arr.ndim != 1 or ref_arr.size == 0:
        raise ValueError(f"ref must be a non-empty 1-D vector, got shape {ref_arr.shape}")
    pts = np.asarray(points, dtype=float)
    if pts.size == 0:
        return 0.0
    if pts.ndim != 2 or pts.shape[1] != ref_arr.size:
        raise ValueError(f"points must have shape (n, {ref_arr.size}) to match ref, got shape {pts.shape}")
    if not (np.isfinite(pts).all() and np.isfinite(ref_arr).all()):
        raise ValueError("points and ref must be finite (found NaN or infinity)")
    if maximize:
        pts, ref_arr = -pts, -ref_arr
    pts = pts[np.all(pts < ref_arr, axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(moocore.hypervolume(pts, ref=ref_arr))


@dataclass
class FrontSummary:
    """One method configuration's front over the preference vectors it was run at."""

    modelpool: str
    taskpool: str
    method: str
    params: dict[str, Any]
    seed: int
    tasks: list[str]
    points: int
    non_dominated: int
    hypervolume: float
    reference: str  # "pretrained" or "zero"
    preferences: list[list[float] | None] = field(default_factory=list)
    """The non-dominated points' preference vectors, in store order."""
    front: list[list[float]] = field(default_factory=list)
    """The non-dominated points' objective values (lower-is-better metrics negated), aligned with `preferences`."""
    scores: list[list[float]] = field(default_factory=list)
    """Every point's objective values, dominated ones included (for plots)."""
    ref: list[float] = field(default_factory=list)
    """The reference point's objective values."""


def _objectives(row: CellResult, tasks: Sequence[str], primary: dict[str, dict[str, Any]]) -> list[float] | None:
    """The row's maximised score per task, or None when a task or its metric is missing or not finite."""
    values = []
    for task in tasks:
        spec = primary.get(task, {})
        value = row.metrics.get(task, {}).get(spec.get("metric", "accuracy"))
        if value is None or not math.isfinite(value):
            return None
        values.append(float(value) if spec.get("higher_is_better", True) else -float(value))
    return values


def front_summaries(results: Sequence[CellResult]) -> list[FrontSummary]:
    """One FrontSummary per method configuration among the ok method rows, in store order."""
    groups: dict[tuple[str, str, str, str, int], list[CellResult]] = {}
    pretrained: dict[tuple[str, str], CellResult] = {}
    for r in results:
        if r.status != "ok":
            continue
        if r.kind == "reference":
            if r.method == "pretrained":
                pretrained.setdefault((r.modelpool, r.taskpool), r)
            continue
        key = (r.modelpool, r.taskpool, r.method, json.dumps(r.params, sort_keys=True, default=str), r.seed)
        groups.setdefault(key, []).append(r)
    summaries = []
    for (modelpool, taskpool, method, _, seed), rows in groups.items():
        tasks = list(dict.fromkeys(t for r in rows for t in r.metrics))
        if not tasks:
            log.warning("front %s %s on %s: no task metrics stored; skipped", method, rows[0].params, modelpool)
            continue
        primary: dict[str, dict[str, Any]] = {}
        for r in rows:
            primary = {**r.primary_metrics, **primary}  # the first row that names a task's metric wins
        scored = [(r, _objectives(r, tasks, primary)) for r in rows]
        for r, obj in scored:
            if obj is None:
                log.warning("front %s %s on %s: dropping the point at preference %s (a task's metric is missing)",
                            method, r.params, modelpool, r.preference)
        scored = [(r, obj) for r, obj in scored if obj is not None]
        pre = pretrained.get((modelpool, taskpool))
        ref = _objectives(pre, tasks, primary) if pre is not None else None
        reference = "pretrained" if ref is not None else "zero"
        if pre is not None and ref is None:
            log.warning("pretrained row of %s on %s lacks some of %s; using a zero reference", modelpool, taskpool,
                        tasks)
        pts = np.array([obj for _, obj in scored], dtype=float).reshape(len(scored), len(tasks))
        mask = non_dominated(pts)
        summaries.append(FrontSummary(
            modelpool=modelpool, taskpool=taskpool, method=method, params=dict(rows[0].params), seed=seed,
            tasks=tasks, points=len(scored), non_dominated=int(mask.sum()),
            hypervolume=hypervolume(pts[mask], ref if ref is not None else [0.0] * len(tasks)), reference=reference,
            preferences=[r.preference for (r, _), m in zip(scored, mask, strict=True) if m], front=pts[mask].tolist(),
            scores=pts.tolist(), ref=list(ref) if ref is not None else [0.0] * len(tasks)))
        log.debug("front %s: %d points, %d non-dominated", method, len(scored), int(mask.sum()))
    return summaries


def _points_table(points: Sequence[FrontSummary], fronts: Sequence[FrontSummary], labels: dict[int, str],
                  higher: Sequence[bool], fmt: str) -> str:
    """Configurations run at one preference (or none): each a point, with its scores in % and the fronts that
    dominate it, rather than a one-point "front" whose hypervolume says nothing."""
    headers = ["Method", "Preference", *(f"{t} (%)" for t in points[0].tasks), "Dominated by"]
    body = []
    for p in sorted(points, key=lambda p: labels[id(p)]):
        (score,) = p.scores
        beaten = [labels[id(f)] for f in fronts if f.tasks == p.tasks and not non_dominated([score, *f.front])[0]]
        shown = [v if up else -v for v, up in zip(score, higher, strict=True)]  # objectives back to metric values
        body.append([labels[id(p)], preference_label(p.preferences[0]) or "none", *(f"{100 * v:.1f}" for v in shown),
                     ", ".join(beaten) or "none"])
    return tabulate(body, headers=headers, tablefmt=_TABULATE[fmt], disable_numparse=True)


def render_pareto(results: Sequence[CellResult], fmt: str = "github") -> str:
    """Front tables, one per (model pool, task pool), best hypervolume first.

    Only configurations run at more than one preference have a front; in `github`, `latex` and `html`, the others
    are listed as points below the fronts (their scores, and which fronts dominate them), and a pool with no front
    at all is one line. `csv` and `json` keep one row per configuration, points included, for scripts."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    summaries = front_summaries(results)
    if fmt == "json":
        return json.dumps([asdict(s) for s in summaries], indent=2, default=str)
    tables: dict[tuple[str, str], list[FrontSummary]] = {}
    for s in summaries:
        tables.setdefault((s.modelpool, s.taskpool), []).append(s)
    headers = ["Method", "Points", "Non-dominated", "Hypervolume"]
    out = []
    for (modelpool, taskpool), here in tables.items():
        labels = dict(zip(map(id, here), front_labels(here), strict=True))  # one naming for fronts and points
        if fmt == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(["modelpool", "taskpool", *headers])
            writer.writerows([modelpool, taskpool, labels[id(f)], f.points, f.non_dominated, f"{f.hypervolume:.4g}"]
                             for f in sorted(here, key=lambda f: -f.hypervolume))
            out.append(buf.getvalue().rstrip("\n"))
            continue
        fronts = sorted([f for f in here if f.points > 1], key=lambda f: -f.hypervolume)
        points = [f for f in here if f.points == 1]
        if not fronts:
            line = (f"{modelpool} on {taskpool}: no preference front, {len(points)} single point(s) run at one "
                    "preference or none (`mergebench leaderboard` lists them)")
            out.append({"github": f"### {line}", "latex": f"% {line}", "html": f"<p>{line}</p>"}[fmt])
            continue
        reference = " or ".join(_REFERENCE_TEXT[r] for r in sorted({f.reference for f in fronts}))
        title = f"{modelpool} on {taskpool}: Pareto fronts (reference: {reference})"
        note = "Hypervolume in the metrics' units (fractions, not %), multiplied across tasks."
        body = [[labels[id(f)], str(f.points), str(f.non_dominated), f"{f.hypervolume:.4g}"] for f in fronts]
        table = tabulate(body, headers=headers, tablefmt=_TABULATE[fmt], disable_numparse=True)
        points = [p for p in points if p.tasks == fronts[0].tasks]
        heading, listing = "", ""
        if points:
            primary = _primary(results, modelpool, taskpool)
            higher = [bool(primary.get(t, {}).get("higher_is_better", True)) for t in fronts[0].tasks]
            heading = f"Single points (run at one preference or none): {len(points)}"
            listing = _points_table(points, fronts, labels, higher, fmt)
        if fmt == "github":
            text = [f"### {title}", "", table, "", note, *(["", heading, "", listing] if points else [])]
        elif fmt == "latex":
            text = [f"% {title}", table, f"% {note}", *([f"% {heading}", listing] if points else [])]
        else:
            text = [f"<h3>{title}</h3>", table, f"<p>{note}</p>", *([f"<h4>{heading}</h4>", listing] if points else [])]
        out.append("\n".join(text))
    return "\n\n".join(out)


def _primary(results: Sequence[CellResult], modelpool: str, taskpool: str) -> dict[str, dict[str, Any]]:
    """Each task's primary metric on one pool (the first row that names it wins, as in `front_summaries`)."""
    primary: dict[str, dict[str, Any]] = {}
    for r in results:
        if (r.modelpool, r.taskpool) == (modelpool, taskpool):
            primary = {**r.primary_metrics, **primary}
    return primary
