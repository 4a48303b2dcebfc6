"""Weights & Biases logger for mergebench, offline: every run is a local W&B run directory, nothing is uploaded.

`mergebench run ... --logger wandb` makes one W&B run per cell computed (cells reused from the store make none),
started when the cell opens, with the cell's configuration (method, parameters, pools, seed, preference, ...) as the
run's config, and every step a training cell logs as a history row at that step. Each derived-pool expert trained on
the way gets a run of its own (config: pool and expert), started at its first step, so an expert read from the
cache leaves none. Where the core hands a logger the cell's outcome (an optional `summary(summary)` call before
`close()`), the run's summary also gets the cell's metrics (`metrics/<task>/<metric>`, `mean`, `normalized_mean`,
timings, `status`, `error`) and its config the versions (`versions`); a failed cell finishes its run with exit
code 1.

W&B always runs in offline mode here: runs land in `<dir>/wandb/offline-run-<time>-<id>/` and never touch the
network (no login, no upload, no system metrics, no machine metadata, no error reporting). Upload them later, from a
machine that can, with `wandb sync <dir>/wandb/offline-run-*`.

Configuration (environment variables, read when a run starts):

- `MERGEBENCH_WANDB_DIR`: the folder that receives `wandb/offline-run-*` (default: `WANDB_DIR` if set, else the
  current directory, as W&B itself does).
- `MERGEBENCH_WANDB_PROJECT`: the W&B project the runs belong to when synced (default `mergebench`).
- `MERGEBENCH_WANDB_ENTITY`: the W&B entity (user or team) for a later sync (default: none, W&B's default entity).
- `WANDB_ERROR_REPORTING`: set to `false` by this plugin unless already set, so wandb's service sends no error
  reports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergebench_core import hookimpl

NAME = "wandb"


def _settings_for(wandb: Any) -> Any:
    """Offline, quiet and local: no console capture (the CLI's own output stays clean), no system metrics, no
    machine or git metadata. Settings a given wandb release does not know are left out."""
    wanted = {"mode": "offline", "silent": True, "quiet": True, "console": "off", "save_code": False,
              "disable_code": True, "disable_git": True, "disable_job_creation": True, "x_disable_stats": True,
              "x_disable_meta": True, "x_disable_machine_info": True}
    known = getattr(wandb.Settings, "model_fields", None)
    if known is not None:
        wanted = {k: v for k, v in wanted.items() if k in known}
    return wandb.Settings(**wanted)


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)
    return out


def _display_name(run_name: str, info: Mapping[str, Any]) -> str:
    """`linear_scalarization 3f2a9c1d` for a cell (its key is 32 hex digits), the run name itself otherwise."""
    if "method" in info and "/" not in run_name:
        return f"{info['method']} {run_name[:8]}"
    return run_name


class WandbLogger:
    """One offline W&B run. A cell's starts when the cell opens (every cell's configuration is logged, and W&B's
    start-up stays outside the cell's timings); a derived expert's at its first step (a cached expert leaves none)."""

    def __init__(self, run_name: str, info: Mapping[str, Any]):
        self.run_name, self.info = run_name, dict(info)
        self.run: Any = None
        self.exit_code = 0
        if "method" in self.info:
            self._start()

    @staticmethod
    def prepare() -> Any:
        """Import wandb (duck-typed: a core that runs cells in forked workers can call it once in the driver, so
        that each worker does not import it again). Returns the module."""
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # read when wandb starts its service
        try:
            import wandb
        except ImportError as exc:  # pragma: no cover - a dependency of this distribution
            raise RuntimeError("the wandb logger needs the wandb package: pip install wandb") from exc
        return wandb

    def _start(self) -> Any:
        if self.run is None:
            wandb = self.prepare()
            folder = os.environ.get("MERGEBENCH_WANDB_DIR") or os.environ.get("WANDB_DIR") or os.getcwd()
            Path(folder).mkdir(parents=True, exist_ok=True)
            derived = "method" not in self.info
            self.run = wandb.init(
                project=os.environ.get("MERGEBENCH_WANDB_PROJECT") or "mergebench",
                entity=os.environ.get("MERGEBENCH_WANDB_ENTITY") or None,
                dir=folder, name=_display_name(self.run_name, self.info),
                group=self.info.get("modelpool") or self.info.get("pool"),
                job_type="derived-expert" if derived else "cell",
                config={**self.info, "mergebench_run": self.run_name},
                settings=_settings_for(wandb), reinit="create_new")
        return self.run

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._start().log({str(k): float(v) for k, v in metrics.items()}, step=int(step))  # NaN and inf kept

    def summary(self, summary: Mapping[str, Any]) -> None:
        """The cell's outcome: metrics into the run's summary, versions into its config (duck-typed: the core calls
        it where it offers summaries)."""
        run = self._start()
        flat = _flat("metrics", summary.get("metrics") or {}, {})
        for key in ("mean", "normalized_mean", "merge_seconds", "eval_seconds", "peak_memory_mb"):
            if isinstance(summary.get(key), (int, float)):
                flat[key] = float(summary[key])
        status = summary.get("status")
        if status is not None:
            flat["status"] = str(status)
            self.exit_code = 0 if status == "ok" else 1
        if summary.get("error"):
            flat["error"] = str(summary["error"])
        run.summary.update(flat)
        if summary.get("versions"):
            run.config.update({"versions": dict(summary["versions"])}, allow_val_change=True)

    def close(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=self.exit_code)


@hookimpl
def register_loggers(register):
    register(NAME, WandbLogger, "Weights & Biases, offline: a local run directory per cell (wandb sync uploads it)")
