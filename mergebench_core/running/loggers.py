"""Where per-step metrics (training curves) go.

Every run writes them as JSON lines next to the results store (`<store>.logs/<run>.jsonl`, one object per logged
step), which `mergebench show` reads back. Plugins add other destinations (W&B, MLflow) through the
`register_loggers` hook; `mergebench run --logger NAME` switches them on.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

LoggerFactory = Callable[[str, Mapping[str, Any]], "MetricsLogger"]
"""`factory(run_name, run_info)`: run_info holds the cell's method, parameters, pools, seed, preference, versions."""


class MetricsLogger(Protocol):
    """`log` per step and `close` at the end; a logger may also have `summary(outcome)`, called once per cell before
    `close` with its status, scores, times, versions and extras."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("._") or "run"


class JsonlLogger:
    """One JSON object per call: {"step": n, **metrics}; the file is flushed per line, so a crash keeps the curve."""

    def __init__(self, path: Path):
        self.path = path
        self._file: Any = None  # opened on the first row: cells that log nothing leave no file

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[str(k)] = v if math.isfinite(v) else str(v)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class FanOut:
    """Hands each call to several loggers; what the run context calls."""

    def __init__(self, loggers: Sequence[MetricsLogger]):
        self.loggers = list(loggers)

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def summary(self, summary: Mapping[str, Any]) -> None:
        """The cell's outcome (status, scores, times, versions, extras), once before `close`, to each logger that has
        a `summary` method (it is optional)."""
        for logger in self.loggers:
            method = getattr(logger, "summary", None)
            if callable(method):
                method(summary)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def logs_dir(store_path: Path) -> Path:
    """`mergebench-results.sqlite` -> `mergebench-results.logs/`."""
    return store_path.with_suffix(".logs")


def log_path(store_path: Path, run_name: str) -> Path:
    parts = [_safe(p) for p in run_name.split("/")]
    return logs_dir(store_path).joinpath(*parts).with_suffix(".jsonl")


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log; a torn last line (a crash mid-write) is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class LoggerSet:
    """The loggers of one run: JSON lines beside the store, plus the plugins' loggers the user switched on."""

    def __init__(self, store_path: Path | None, extra: Mapping[str, LoggerFactory] | None = None):
        self.store_path, self.extra = store_path, dict(extra or {})

    def open(self, run_name: str, info: Mapping[str, Any]) -> FanOut:
        loggers: list[MetricsLogger] = []
        if self.store_path is not None:
            loggers.append(JsonlLogger(log_path(self.store_path, run_name)))
        loggers += [factory(run_name, info) for factory in self.extra.values()]
        return FanOut(loggers)
