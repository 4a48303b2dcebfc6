"""Reading a stored row back: what each column must hold, and the reason a row is damaged when it does not.

A store is a file other programs can write (a hand edit, a sync conflict, a tool that knows SQLite but not us), so
nothing read from it is trusted: a row whose columns do not hold what `CellResult` needs is reported and skipped
instead of crashing a table or showing nonsense in it. Numbers must be finite and of a sane size: Python's JSON reads
`NaN` and `Infinity`, and SQLite stores infinities, and a table would print them as `nan`/`inf` as if they had been
measured.
"""

from __future__ import annotations

import json
import math
from typing import Any

JSON_FIELDS = ("params", "preference", "metrics", "primary_metrics", "extras", "versions", "config", "identity",
               "curve")
"""Columns stored as JSON text."""

LARGEST = 1e150
"""The largest magnitude a stored score, time or size may have. Tables multiply scores by 100, add them over seeds and
square them for the standard deviation; past about 1e154 a square overflows to infinity. No accuracy, loss, second or
megabyte comes near this, so a larger number is damage (a flipped exponent, a hand edit), not a measurement."""


class DamagedRow(Exception):
    """A stored row that cannot be read back as a `CellResult`; the message names the column and what it holds."""


_NUMBER = (int, float)
_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    # column: (accepted types, may be NULL)
    "kind": ((str,), False), "method": ((str,), False), "modelpool": ((str,), False), "taskpool": ((str,), False),
    "status": ((str,), False), "seed": ((int,), False), "eval_limit": ((int,), True),
    "mean": (_NUMBER, True), "normalized_mean": (_NUMBER, True), "merge_seconds": (_NUMBER, True),
    "peak_memory_mb": (_NUMBER, True), "eval_seconds": (_NUMBER, True), "error": ((str,), True),
    "traceback": ((str,), True), "task_specific": ((int,), False), "created_at": (_NUMBER, False),
    "params": ((dict,), False), "preference": ((list,), True), "metrics": ((dict,), False),
    "primary_metrics": ((dict,), False), "extras": ((dict,), False), "versions": ((dict,), False),
    "config": ((dict,), False), "identity": ((dict,), False), "task_order": ((int,), True), "curve": ((list,), True),
}
_MEASURED = ("mean", "normalized_mean", "merge_seconds", "peak_memory_mb", "eval_seconds", "created_at")
"""Number columns that tables and sorting compute with; each must pass `_sane`."""


def _sane(value: Any) -> bool:
    """A finite number no larger than `LARGEST` in magnitude (not a bool: JSON's true is not a number here)."""
    return isinstance(value, _NUMBER) and not isinstance(value, bool) and math.isfinite(value) and \
        abs(value) <= LARGEST


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row's columns (JSON decoded, types checked) as `CellResult` fields; `DamagedRow` naming the first
    column that is not what it should be."""
    for f in JSON_FIELDS:
        if f in row and row[f] is not None:
            if not isinstance(row[f], str):
                raise DamagedRow(f"column {f!r} holds {type(row[f]).__name__} {row[f]!r}, not JSON text")
            try:
                row[f] = json.loads(row[f])
            except ValueError as exc:
                raise DamagedRow(f"column {f!r} is not valid JSON ({exc})") from None
    for column, value in row.items():
        if column not in _TYPES:
            continue
        types, nullable = _TYPES[column]
        if value is None and nullable:
            continue
        if not isinstance(value, types) or isinstance(value, bool):  # (JSON's true is not a number here)
            raise DamagedRow(f"column {column!r} holds {type(value).__name__} {value!r}, expected "
                             f"{' or '.join(t.__name__ for t in types)}{' or null' if nullable else ''}")
    for column in _MEASURED:
        if row.get(column) is not None and not _sane(row[column]):
            raise DamagedRow(f"column {column!r} holds {row[column]!r}, not a finite number of at most {LARGEST:g}")
    for task, values in row.get("metrics", {}).items():
        if not isinstance(values, dict) or not all(v is None or isinstance(v, _NUMBER) for v in values.values()):
            raise DamagedRow(f"column 'metrics' holds {values!r} for task {task!r}, expected numbers by metric name")
        bad = {name: v for name, v in values.items() if v is not None and not _sane(v)}
        if bad:
            raise DamagedRow(f"column 'metrics' holds {bad!r} for task {task!r}, not finite numbers of at most "
                             f"{LARGEST:g}")
    if row.get("preference") is not None and not all(_sane(v) for v in row["preference"]):
        raise DamagedRow(f"column 'preference' holds {row['preference']!r}, expected a list of finite numbers")
    row["task_specific"] = bool(row["task_specific"])
    return row
