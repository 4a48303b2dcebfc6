"""Building leaderboard tables from stored cells: one `Table` per (model pool, task pool).

Cells that differ only by seed (or, for continual methods, task order) become one row (means and sample standard deviations over the seeds); when the store
holds several cells for the same configuration and seed, the newest is used. Rows are labelled by their non-default
parameters (`labels`), filtered to the methods asked for, and given the columns `--columns` names.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

from mergebench_core.data.evaluation import primary_value
from mergebench_core.errors import MergebenchError, normalize_name
from mergebench_core.results.labels import REFERENCE_LABELS, Defaults, canonical, installed_defaults, shown_parameters
from mergebench_core.results.rows import (
    COLUMN_ALIASES,
    DEFAULT_COLUMNS,
    OPTIONAL_COLUMNS,
    SUMMARY_COLUMNS,
    Column,
    Row,
    Stat,
    Table,
)
from mergebench_core.results.store import CellResult


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


def split_names(spec: str | Sequence[str] | None) -> list[str]:
    """`a,b` or `["a", "b,c"]` -> the names, stripped, empty ones dropped."""
    if spec is None:
        return []
    items = [spec] if isinstance(spec, str) else list(spec)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def select_methods(methods: str | Sequence[str] | None, stored: Sequence[str]) -> set[str] | None:
    """The method names asked for (`-m ties,dare-ta`: any spelling `normalize_name` accepts), each checked against
    the `stored` ones; None when none are asked for, meaning all. A name the store lacks is an error that lists
    what it has."""
    names = split_names(methods)
    if not names:
        return None
    wanted = {normalize_name(m) for m in names}
    have = set(stored)
    missing = sorted(wanted - have)
    if missing:
        close = sorted({c for m in missing for c in difflib.get_close_matches(m, sorted(have), n=2, cutoff=0.6)})
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise MergebenchError(f"no stored results for method(s) {', '.join(missing)}{hint}; the store has "
                              f"{', '.join(sorted(have)) or 'none'}")
    return wanted


def _config_key(c: CellResult, history: bool = False) -> tuple:
    key = (c.kind, c.method, canonical(c.params), canonical(c.preference), c.eval_limit, c.task_specific)
    return key + (canonical(getattr(c, "identity", None) or {}),) if history else key


def newest_per_seed(cells: Sequence[CellResult]) -> list[CellResult]:
    """One cell per (configuration, seed, task order): the newest, so a rerun or a newer version replaces the older
    cell. Task orders of a continual method, like seeds, are then one row: its scores average over them."""
    newest: dict[tuple, CellResult] = {}
    for c in cells:
        key = (*_config_key(c), c.seed, c.task_order)
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
    row.params_ratio = Stat.of(c.extras.get("params_ratio") for c in cells)
    return row


def _label_params(rows: list[Row], defaults: Defaults) -> None:
    """Fill `shown_params`: non-default parameters, or (method not installed) those varying between its rows."""
    by_method: dict[str, list[Row]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    for name, mine in by_method.items():
        known = defaults(name)
        for r in mine:
            r.defaults = known
            r.shown_params = shown_parameters(r.params, known, [m.params for m in mine])


def _sort_key(r: Row) -> tuple[float, str]:
    mean = r.mean.mean
    return (-(mean if mean is not None and not math.isnan(mean) else -math.inf), r.label())


def _table(modelpool: str, taskpool: str, cells: list[CellResult], *, per_seed: bool, history: bool,
           defaults: Defaults) -> Table:
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
    methods.sort(key=_sort_key)
    return Table(modelpool, taskpool, tasks, {t: primary.get(t, {"metric": "accuracy", "higher_is_better": True})
                                              for t in tasks}, refs, methods, failed)


def build_tables(results: Sequence[CellResult], *, per_seed: bool = False, columns: str | Sequence[str] | None = None,
                 defaults: Defaults | None = None, history: bool = False,
                 methods: str | Sequence[str] | None = None, mark_costs: bool = False) -> list[Table]:
    """The tables `render` prints, as data: one per (model pool, task pool), in the order the pools first appear.

    With `history`, cells of an older identity (pool recipe, plugin version) are rows of their own, marked
    superseded, instead of being dropped. `methods` keeps only those methods' rows (and failures) beside the
    reference rows, and only the tables that have some; a paper's table then need not hold every stored row.
    `mark_costs` marks the best merge time and memory too (see `Table.mark_costs`)."""
    wanted = select_methods(methods, [r.method for r in results if r.kind != "reference"])
    if wanted is not None:
        results = [r for r in results if r.kind == "reference" or r.method in wanted]
    tables = []
    for (modelpool, taskpool), cells in group(results).items():
        if not history:
            cells = newest_per_seed(cells)
        table = _table(modelpool, taskpool, cells, per_seed=per_seed, history=history,
                       defaults=defaults or installed_defaults)
        if wanted is not None and not (table.methods or table.failed):
            continue
        table.mark_costs = mark_costs
        tables.append(table)
    choose_columns(tables, columns)
    return tables


def task_column(table: Table, task: str) -> Column:
    """The column of one of `table`'s tasks, ranked the way its primary metric is better."""
    spec = table.primary.get(task, {})
    return Column(task, task, "score", task=task, higher_is_better=bool(spec.get("higher_is_better", True)))


def column_names(tables: Sequence[Table]) -> list[str]:
    """What `--columns` accepts: tasks, each task's name, avg, norm, merge, mem, eval."""
    return ["tasks", *dict.fromkeys(t for tb in tables for t in tb.tasks), *SUMMARY_COLUMNS]


def resolve_column(name: str, tables: Sequence[Table]) -> str:
    """A `--columns` item -> `tasks`, a task's name or a summary column's id (headers such as `Avg.` work too); an
    unknown name is an error that lists the known ones."""
    key = name.strip()
    if key == "tasks" or any(key in tb.tasks for tb in tables):
        return key
    low = key.lower()
    low = COLUMN_ALIASES.get(low, low)
    if low in SUMMARY_COLUMNS or low == "tasks":
        return low
    known = column_names(tables)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise MergebenchError(f"unknown column {name!r}.{hint} Columns: {', '.join(known)}")


def choose_columns(tables: Sequence[Table], spec: str | Sequence[str] | None) -> None:
    """Set each table's columns from a `--columns` value: a list (`tasks,avg,norm`), or removals from the default
    (`-merge,-mem`). Names: `tasks` (every task), a task's name, `avg`, `norm`, `merge`, `mem`, `eval`; headers such
    as `Avg.` or `Merge (s)` work too. An unknown name is an error that lists the known ones."""
    items = split_names(spec)
    all_tasks = {t for tb in tables for t in tb.tasks}
    removals = [i for i in items if i.startswith("-")]
    if removals and len(removals) != len(items):
        raise MergebenchError(f"--columns {','.join(items)}: either list the columns you want or only removals "
                              "(-merge,-mem), not both")
    wanted = [i[1:] for i in removals] if removals else items
    resolved = [resolve_column(w, tables) for w in wanted]
    if removals:
        chosen = [n for n in DEFAULT_COLUMNS if n not in resolved]
        dropped_tasks = set(resolved) & all_tasks
    else:
        chosen = resolved or list(DEFAULT_COLUMNS)
        dropped_tasks = set()
    for table in tables:
        cols: list[Column] = []
        shown = list(chosen)
        if (not items or removals) and any(r.params_ratio.mean is not None for r in table.rows):
            shown += [n for n in OPTIONAL_COLUMNS if n not in resolved]  # upscaled rows: their size beside the score
        for name in shown:
            if name == "tasks":
                cols += [task_column(table, t) for t in table.tasks if t not in dropped_tasks]
            elif name in SUMMARY_COLUMNS:
                cols.append(SUMMARY_COLUMNS[name])
            elif name in table.tasks:
                cols.append(task_column(table, name))
        seen: set[str] = set()
        table.columns = [c for c in cols if not (c.id in seen or seen.add(c.id))]  # type: ignore[func-returns-value]
