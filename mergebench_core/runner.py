"""Expands a selection into cells, runs each, and stores each result the moment it is known.

Everything that can be checked before work starts is checked first (names, parameters, pool construction), so a
typo fails in a second, not after an hour of merging. A cell that raises is stored as failed, with its error and
traceback, and the grid goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .api import PRETRAINED, Method, ModelPool, Registration, RunContext, TaskPool
from .config import build_params, check_overrides_used, load_yaml, params_dict, parse_overrides
from .errors import MergebenchError
from .evaluation import Metrics, evaluate
from .paths import cache_dir
from .registry import Registry
from .resources import measure
from .store import CellResult, ResultStore, cell_key

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    methods: Sequence[str] | None = None
    """Method names; None runs every installed method."""
    modelpools: Sequence[str] | None = None
    """Model pool names; None runs the pools their plugins mark as default."""
    taskpool: str | None = None
    """Score with this task pool instead of each model pool's default."""
    overrides: Sequence[str] = ()
    config_file: str | Path | None = None
    seeds: Sequence[int] = (0,)
    limit: int | None = None
    device: str = "auto"
    rerun: bool = False
    batch_size: int = 256
    cache_dir: Path = field(default_factory=cache_dir)
    dtype: str | None = None
    """Load models in this dtype (pools that support it: float32, bfloat16, float16)."""
    trust_pickle: bool = False
    """Allow pools to unpickle checkpoints (arbitrary code); off by default."""


@dataclass
class Cell:
    method: str
    method_cls: type[Method]
    registration: Registration
    params: Any
    modelpool: str
    taskpool: str
    seed: int

    @property
    def label(self) -> str:
        return f"{self.method} on {self.modelpool}"


@dataclass
class RunReport:
    results: list[CellResult] = field(default_factory=list)
    skipped: int = 0
    not_applicable: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[CellResult]:
        return [r for r in self.results if r.status != "ok"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment_versions() -> dict[str, str]:
    out = {}
    for dist in ("mergebench", "torch", "transformers"):
        v = _version(dist)
        if v:
            out[dist] = v
    return out


class Runner:
    def __init__(self, registry: Registry, store: ResultStore, options: RunOptions,
                 progress: Callable[..., Iterator[Any]] | None = None):
        self.registry, self.store, self.options, self.progress = registry, store, options, progress
        self.device = resolve_device(options.device)
        self._modelpools: dict[str, ModelPool] = {}
        self._taskpools: dict[str, TaskPool] = {}

    # -- pools ------------------------------------------------------------------------------------------------
    def modelpool(self, name: str) -> ModelPool:
        if name not in self._modelpools:
            reg = self.registry.modelpool(name)
            pool = reg.obj()
            pool.name = pool.name or reg.name
            pool.configure(dtype=self.options.dtype, trust_pickle=self.options.trust_pickle)
            self._modelpools[name] = pool
        return self._modelpools[name]

    def taskpool(self, name: str) -> TaskPool:
        if name not in self._taskpools:
            reg = self.registry.taskpool(name)
            pool = reg.obj()
            pool.name = pool.name or reg.name
            pool.configure(dtype=self.options.dtype, trust_pickle=self.options.trust_pickle)
            self._taskpools[name] = pool
        return self._taskpools[name]

    def taskpool_for(self, modelpool: str) -> str:
        if self.options.taskpool:
            return self.registry.taskpool(self.options.taskpool).name
        reg = self.registry.modelpool(modelpool)
        pool = self.modelpool(reg.name)
        if not pool.default_taskpool:
            raise MergebenchError(f"model pool {modelpool!r} names no default task pool; pass --taskpool")
        return self.registry.taskpool(pool.default_taskpool).name

    # -- planning ---------------------------------------------------------------------------------------------
    def plan(self) -> list[Cell]:
        opts = self.options
        method_names = list(opts.methods) if opts.methods else sorted(self.registry.methods)
        regs = [self.registry.method_registration(m) for m in method_names]
        if opts.modelpools:
            pool_names = [self.registry.modelpool(p).name for p in opts.modelpools]
        else:
            pool_names = [n for n, r in sorted(self.registry.modelpools.items()) if r.default]
            if not pool_names:
                raise MergebenchError("no model pool selected and no installed pool is marked as default; "
                                      "pass --modelpool (see `mergebench list`)")
        overrides = parse_overrides(opts.overrides)
        yaml_cfg = load_yaml(opts.config_file)
        check_overrides_used(overrides, {r.name: r.obj.Params for r in regs})
        cells = []
        for pool_name in pool_names:
            taskpool = self.taskpool_for(pool_name)
            for reg in regs:
                for params in build_params(reg.name, reg.obj.Params, yaml_cfg, overrides):
                    for seed in opts.seeds:
                        cells.append(Cell(reg.name, reg.obj, reg, params, pool_name, taskpool, seed))
        self.check_resources(dict.fromkeys((c.modelpool, c.taskpool) for c in cells))
        return cells

    def check_resources(self, pairs: Iterable[tuple[str, str]]) -> None:
        """One error naming every missing model and dataset of every selected pool, before any work starts."""
        pairs = list(pairs)
        missing: dict[str, None] = {}
        pools = list(dict.fromkeys(p for p, _ in pairs))
        for pool_name, taskpool_name in pairs:
            for item in [*self.modelpool(pool_name).missing_resources(),
                         *self.taskpool(taskpool_name).missing_resources()]:
                missing[item] = None
        if missing:
            listing = "".join(f"\n  - {m}" for m in missing)
            commands = "\n".join(f"  mergebench download --modelpool {p}" for p in pools)
            raise MergebenchError(f"{len(missing)} resource(s) needed by this run are not on this machine and "
                                  f"cannot be fetched now (offline):{listing}\n"
                                  f"Fetch them on a machine with internet:\n{commands}")

    # -- running ----------------------------------------------------------------------------------------------
    def run(self, cells: list[Cell] | None = None) -> RunReport:
        cells = self.plan() if cells is None else cells
        report = RunReport()
        for pool_name, taskpool_name in dict.fromkeys((c.modelpool, c.taskpool) for c in cells):
            report.results.extend(self.references(pool_name, taskpool_name))
        for cell in cells:
            if not self.options.methods:  # "every installed method": skip those that cannot apply to this pool
                reason = cell.method_cls.unsuitable_for(self.modelpool(cell.modelpool), cell.params)
                if reason:
                    log.info("skipping %s: %s", cell.label, reason)
                    report.not_applicable.append(f"{cell.method} on {cell.modelpool}: {reason}")
                    continue
            stored = None if self.options.rerun else self.store.get(self.key(cell))
            if stored is not None and stored.status == "ok":
                log.info("skipping %s (already in the store)", cell.label)
                report.results.append(stored)
                report.skipped += 1
                continue
            result = self.run_cell(cell)
            self.store.put(result)
            report.results.append(result)
        return report

    def key(self, cell: Cell) -> str:
        return cell_key("method", cell.method, params_dict(cell.params), cell.modelpool, cell.taskpool, cell.seed,
                        self.options.limit, None)

    def _evaluate(self, taskpool: TaskPool, model: Any, tasks: Sequence[str] | None = None) -> Metrics:
        return evaluate(taskpool, model, tasks=tasks, limit=self.options.limit, device=self.device,
                        batch_size=self.options.batch_size, progress=self.progress)

    def references(self, pool_name: str, taskpool_name: str) -> list[CellResult]:
        """The pretrained model on every task and each expert on its own task, computed once per pool."""
        pool, taskpool = self.modelpool(pool_name), self.taskpool(taskpool_name)
        rows = []
        if pool.has_pretrained:
            rows.append(self._reference(pool, taskpool, "pretrained",
                                        lambda: self._evaluate(taskpool, pool.load_model(PRETRAINED))))

        def individual() -> Metrics:
            metrics: Metrics = {}
            for expert in pool.expert_names:
                task = pool.task_of(expert)
                if task in taskpool.tasks:
                    metrics.update(self._evaluate(taskpool, pool.load_model(expert), [task]))
            return metrics

        rows.append(self._reference(pool, taskpool, "individual", individual))
        return rows

    def _reference(self, pool: ModelPool, taskpool: TaskPool, label: str,
                   compute: Callable[[], Metrics]) -> CellResult:
        key = cell_key("reference", label, {}, pool.name, taskpool.name, 0, self.options.limit, None)
        stored = None if self.options.rerun else self.store.get(key)
        if stored is not None and stored.status == "ok":
            return stored
        result = CellResult("reference", label, {}, pool.name, taskpool.name, 0, self.options.limit,
                            versions=environment_versions())
        try:
            with measure(self.device) as m:
                result.metrics = compute()
            result.eval_seconds = m.seconds
            result.mean = _mean(result.metrics)
        except Exception as exc:
            self._fail(result, exc)
        self.store.put(result)
        return result

    def run_cell(self, cell: Cell) -> CellResult:
        log.info("running %s (%s)", cell.label, params_dict(cell.params))
        versions = environment_versions()
        versions[cell.registration.distribution or cell.registration.plugin] = cell.registration.version
        result = CellResult(
            "method", cell.method, params_dict(cell.params), cell.modelpool, cell.taskpool, cell.seed,
            self.options.limit, versions=versions, task_specific=cell.method_cls.info.task_specific,
            config={"method": cell.method, "params": params_dict(cell.params), "modelpool": cell.modelpool,
                    "taskpool": cell.taskpool, "seed": cell.seed, "limit": self.options.limit,
                    "device": str(self.device)})
        try:
            pool, taskpool = self.modelpool(cell.modelpool), self.taskpool(cell.taskpool)
            result.versions.update(pool.version_info())
            result.versions.update(taskpool.version_info())
            ctx = RunContext(taskpool=taskpool, device=self.device, seed=cell.seed,
                             cache_dir=Path(self.options.cache_dir), progress=self.progress,
                             log=logging.getLogger(f"mergebench.method.{cell.method}"))
            torch.manual_seed(cell.seed)
            method = cell.method_cls(cell.params)
            with measure(self.device) as merge_m:
                output = method.run(pool, ctx)
            result.merge_seconds, result.peak_memory_mb = merge_m.seconds, merge_m.peak_mb
            result.extras = _jsonable(output.extras)
            with measure(self.device) as eval_m:
                result.metrics = self._evaluate(taskpool, output.model)
            result.eval_seconds = eval_m.seconds
            result.mean = _mean(result.metrics)
            result.normalized_mean = self._normalized(cell, result.metrics)
        except Exception as exc:  # the grid goes on; the error is kept with the cell
            self._fail(result, exc)
        return result

    def _normalized(self, cell: Cell, metrics: Metrics) -> float | None:
        key = cell_key("reference", "individual", {}, cell.modelpool, cell.taskpool, 0, self.options.limit, None)
        ref = self.store.get(key)
        if ref is None or ref.status != "ok":
            return None
        return normalized_mean(metrics, ref.metrics)

    @staticmethod
    def _fail(result: CellResult, exc: BaseException) -> None:
        log.error("%s on %s failed: %s", result.method, result.modelpool, exc)
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()


def _mean(metrics: Metrics, name: str = "accuracy") -> float | None:
    values = [m[name] for m in metrics.values() if name in m]
    return sum(values) / len(values) if values else None


def normalized_mean(metrics: Metrics, individual: Metrics, name: str = "accuracy") -> float | None:
    """Mean over tasks of (merged accuracy / the expert's accuracy on the same task)."""
    ratios = [metrics[t][name] / individual[t][name] for t in metrics
              if t in individual and individual[t].get(name)]
    return sum(ratios) / len(ratios) if ratios else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return value
