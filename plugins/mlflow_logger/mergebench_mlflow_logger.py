"""MLflow logger for mergebench: one MLflow run per cell, in a local file store by default.

`mergebench run ... --logger mlflow` makes one MLflow run per cell computed (cells reused from the store make none),
created when the cell opens. The cell's configuration becomes the run's parameters (nested keys dotted: `method`,
`params.steps`, `modelpool`, `seed`, ...), every step a training cell logs becomes metric values at that step, and
the run is set FINISHED when the cell closes. Metric names have their `/` turned into `.` (`loss/train/digits` is
`loss.train.digits`): MLflow's file store keeps each metric as a file path, where `loss` and `loss/train/digits`
cannot both exist. Each derived-pool expert trained on the way gets a run of its own
(parameters: pool and expert), created at its first step, so an expert read from the cache leaves none. Where the
core hands a logger the cell's outcome (an optional `summary(summary)` call before `close()`), the run also gets the
cell's metrics (`metrics.<task>.<metric>`, `mean`, `normalized_mean`, timings, at the last logged step), the versions
as `versions.<name>` parameters, and a failed cell ends FAILED with its error as the `mergebench.error` tag. Each run
carries the runner's name for it (the cell key, or `derived/<pool>/<expert>`) as the `mergebench.run` tag.

Configuration (environment variables, read when a run starts):

- `MERGEBENCH_MLFLOW_DIR`: the folder of the local file store (default `./mlruns`, as MLflow's own default); the
  tracking URI is `file:<that folder, absolute>`. Browse it with `mlflow ui --backend-store-uri file:<folder>`.
- `MERGEBENCH_MLFLOW_TRACKING_URI`: any other tracking URI instead (`sqlite:///runs.db` with the full `mlflow`
  package, or a tracking server); it takes precedence over `MERGEBENCH_MLFLOW_DIR`. MLflow's own
  `MLFLOW_TRACKING_URI` is not read, so a setting meant for other tools never sends mergebench runs elsewhere.
- `MERGEBENCH_MLFLOW_EXPERIMENT`: the experiment the runs go to, created when missing (default `mergebench`).
- `MLFLOW_ALLOW_FILE_STORE`: MLflow 3 keeps the file store in maintenance mode behind this switch; this plugin sets
  it to `true` unless already set, and only when the tracking URI is a `file:` URI.
- `MLFLOW_DISABLE_TELEMETRY`: set to `true` by this plugin unless already set (before MLflow is imported), so MLflow
  sends no usage telemetry.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mergebench_core import hookimpl

NAME = "mlflow"
_BATCH = 100  # MLflow's limit on parameters per log_batch call (metrics allow 1000)
_MAX_VALUE = 6000  # MLflow's limit on a parameter's value


def tracking_uri() -> str:
    """The tracking URI the logger writes to, from the environment (see the module's docstring)."""
    uri = os.environ.get("MERGEBENCH_MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = Path(os.environ.get("MERGEBENCH_MLFLOW_DIR") or "mlruns").resolve()
    return folder.as_uri()


def _key(name: str) -> str:
    """A metric or parameter name MLflow accepts in any store: `/` becomes `.` (the file store keeps each name as a
    file path, so `loss` and `loss/train/digits` could not both exist), other characters than letters, digits,
    `_ - . space` become `_`, and the name is at most 250 characters."""
    key = re.sub(r"[^\w\-. ]", "_", str(name).replace("/", "."))[:250]
    return "_" * len(key) if key in ("", ".", "..") else key


def _param_value(value: Any) -> str:
    """Strings as they are, lists and mappings as JSON, anything else as `str()` does; cut to MLflow's limit."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple, Mapping)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text if len(text) <= _MAX_VALUE else text[:_MAX_VALUE - 1] + "…"


def flat_params(info: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"params": {"steps": 4}, "seed": 0} -> {"params.steps": "4", "seed": "0"}; lists as JSON."""
    out: dict[str, str] = {}
    for k, v in info.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flat_params(v, f"{key}."))
        else:
            out[_key(key)] = _param_value(v)
    return out


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _display_name(run_name: str, info: Mapping[str, Any]) -> str:
    """`linear_scalarization 3f2a9c1d` for a cell (its key is 32 hex digits), the run name itself otherwise."""
    if "method" in info and "/" not in run_name:
        return f"{info['method']} {run_name[:8]}"
    return run_name


class MlflowLogger:
    """One MLflow run. A cell's is created when the cell opens (every cell's configuration is logged, and MLflow's
    start-up stays outside the cell's timings); a derived expert's at its first step (a cached expert leaves none)."""

    def __init__(self, run_name: str, info: Mapping[str, Any]):
        self.run_name, self.info = run_name, dict(info)
        self.client: Any = None
        self.run_id: str | None = None
        self.status = "FINISHED"
        self.last_step = 0
        if "method" in self.info:
            self._start()

    @staticmethod
    def prepare() -> None:
        """Import MLflow (duck-typed: a core that runs cells in forked workers can call it once in the driver, so
        that each worker does not import it again)."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is first imported
        if tracking_uri().startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            import mlflow.entities
            import mlflow.tracking  # noqa: F401
        except ImportError as exc:  # pragma: no cover - a dependency of this distribution
            raise RuntimeError("the mlflow logger needs MLflow: pip install mlflow-skinny") from exc

    def _start(self) -> str:
        if self.run_id is None:
            self.prepare()
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking_uri())
            experiment_id = self._experiment(os.environ.get("MERGEBENCH_MLFLOW_EXPERIMENT") or "mergebench")
            kind = "cell" if "method" in self.info else "derived-expert"
            run = self.client.create_run(experiment_id, run_name=_display_name(self.run_name, self.info),
                                         tags={"mergebench.run": self.run_name, "mergebench.kind": kind})
            self.run_id = run.info.run_id
            params = [Param(k, v) for k, v in flat_params(self.info).items()]
            for chunk in _chunks(params, _BATCH):
                self.client.log_batch(self.run_id, params=chunk)
        return self.run_id

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another process created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_key(k), float(v), now, int(step)) for k, v in values.items()]
        for chunk in _chunks(metrics, 1000):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._start()
        self.last_step = max(self.last_step, int(step))
        self._metrics(metrics, step)

    def summary(self, summary: Mapping[str, Any]) -> None:
        """The cell's outcome: metrics at the last logged step, versions as parameters, the status (duck-typed: the
        core calls it where it offers summaries)."""
        from mlflow.entities import Param

        run_id = self._start()
        values: dict[str, float] = {}
        for task, scores in (summary.get("metrics") or {}).items():
            for metric, value in (scores or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values[f"metrics.{task}.{metric}"] = float(value)
        for key in ("mean", "normalized_mean", "merge_seconds", "eval_seconds", "peak_memory_mb"):
            value = summary.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values[key] = float(value)
        if values:
            self._metrics(values, self.last_step)
        versions = flat_params(dict(summary.get("versions") or {}), "versions.")
        for chunk in _chunks([Param(k, v) for k, v in versions.items()], _BATCH):
            self.client.log_batch(run_id, params=chunk)
        status = summary.get("status")
        if status is not None:
            self.client.set_tag(run_id, "mergebench.status", str(status))
            self.status = "FINISHED" if status == "ok" else "FAILED"
        if summary.get("error"):
            self.client.set_tag(run_id, "mergebench.error", str(summary["error"])[:5000])

    def close(self) -> None:
        if self.run_id is not None:
            run_id, self.run_id = self.run_id, None
            self.client.set_terminated(run_id, self.status)


@hookimpl
def register_loggers(register):
    register(NAME, MlflowLogger, "MLflow: a run per cell in a local file store (./mlruns) or any tracking URI")
