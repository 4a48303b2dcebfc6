"""One row's run: a method cell (the method, then its running statistics, checks and scores) or a reference row.

These functions run in a worker (a forked process, a Ray task or the driver) and return the row; they never write
the store. What they need from the grid they take from a `CellHost`, which the runner is: the pools by name, the
options, the device, the batch-norm rule, the loggers and the cell's identity. The runner guarantees a task pool to
every method that declares data (`running.data_needs`): here every cell has one.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch

from mergebench_core.contract.api import PRETRAINED, ModelPool, Registration, RunContext, TaskPool
from mergebench_core.contract.config import params_dict
from mergebench_core.contract.continual import is_continual
from mergebench_core.data.evaluation import Metrics, evaluate, primary_metrics
from mergebench_core.engine.bn_stats import BnStats
from mergebench_core.engine.data_free import TensorMergeMethod
from mergebench_core.engine.roles import Role, has_running_stats
from mergebench_core.engine.running_stats import settle_running_stats
from mergebench_core.results.store import CellResult
from mergebench_core.running.cells import Cell
from mergebench_core.running.checks import check_finite_weights, primary_mean
from mergebench_core.running.loggers import LoggerSet
from mergebench_core.running.options import RunOptions
from mergebench_core.running.resources import measure
from mergebench_core.upscaling.model import size_report
from mergebench_core.running.task_order import CurveRecorder, permutation

log = logging.getLogger(__name__)


class CellHost(Protocol):
    """What one row's run reads from its grid (the `Runner`)."""

    options: RunOptions
    device: torch.device
    bn_stats: BnStats
    progress: Callable[..., Iterator[Any]] | None

    def modelpool(self, name: str) -> ModelPool: ...

    def taskpool(self, name: str) -> TaskPool: ...

    def identity(self, modelpool: str, taskpool: str, registration: Registration | None = None) -> dict[str, Any]: ...

    def pool_roles(self, modelpool: str) -> dict[str, Role]: ...

    def loggers(self) -> LoggerSet: ...

    def key(self, cell: Cell) -> str: ...


def method_blank(host: CellHost, cell: Cell) -> CellResult:
    """The row of a cell before it runs: what produced it, and nothing measured yet."""
    versions = environment_versions()
    versions[cell.registration.distribution or cell.registration.plugin] = cell.registration.version
    pref = cell.preference
    return CellResult(
        "method", cell.method, params_dict(cell.params), cell.modelpool, cell.taskpool, cell.seed,
        host.options.limit, preference=list(pref.normalized) if pref is not None else None,
        versions=versions, task_specific=cell.method_cls.info.task_specific,
        identity=host.identity(cell.modelpool, cell.taskpool, cell.registration), task_order=cell.order,
        config={"method": cell.method, "params": params_dict(cell.params), "modelpool": cell.modelpool,
                "taskpool": cell.taskpool, "seed": cell.seed, "limit": host.options.limit,
                "device": str(host.device),
                "preference_given": list(pref.given) if pref is not None else None,
                "eval_only": host.options.eval_only, **({"task_order": cell.order} if cell.order is not None else {}),
                **({"bn_stats": host.bn_stats.name} if has_running_stats(host.pool_roles(cell.modelpool)) else {})})


def run_method(host: CellHost, cell: Cell) -> CellResult:
    """Run one cell and return its row; its normalised score is the driver's to add."""
    log.info("running %s (%s)", cell.label, params_dict(cell.params))
    pref = cell.preference
    result = method_blank(host, cell)
    loggers = host.loggers()
    metrics_logger = loggers.open(host.key(cell), result.config)
    try:
        pool, taskpool = seeded_pool(host.modelpool(cell.modelpool), cell.seed), host.taskpool(cell.taskpool)
        result.versions.update(pool.version_info())
        result.versions.update(taskpool.version_info())
        result.primary_metrics = primary_metrics(taskpool, taskpool.tasks)
        ctx = RunContext(taskpool=taskpool, device=host.device, seed=cell.seed,
                         preference=pref.normalized if pref is not None else None, tasks=tuple(taskpool.tasks),
                         eval_only=host.options.eval_only, metrics_logger=metrics_logger, loggers=loggers,
                         method_version=code_version(cell.registration),
                         cache_dir=Path(host.options.cache_dir), progress=host.progress,
                         log=logging.getLogger(f"mergebench.method.{cell.method}"), bn_stats=host.bn_stats.name)
        torch.manual_seed(cell.seed)
        method = cell.method_cls(cell.params)
        curve = None
        if is_continual(cell.method_cls):  # the experts arrive in the cell's order; each step is scored
            ctx.task_order = tuple(permutation(pool.expert_names, cell.order or 0))
            ctx.on_step = curve = CurveRecorder(pool.task_of, lambda m, tasks: evaluate_on(host, taskpool, m, tasks),
                                                lambda metrics: primary_mean(metrics, result.primary_metrics))
        with measure(host.device) as merge_m:
            output = method.run(pool, ctx)
            if cell.method_cls.info.kind == "merge":  # running statistics follow the run's rule, not the method
                output.extras.update(settle_running_stats(
                    output.model, pool, host.bn_stats, host.pool_roles(cell.modelpool), taskpool=taskpool,
                    tasks=taskpool.tasks, seed=cell.seed, device=host.device,
                    set_by_engine=isinstance(method, TensorMergeMethod)))
        result.merge_seconds, result.peak_memory_mb = merge_m.seconds, merge_m.peak_mb
        if cell.method_cls.info.kind == "upscale" and "params_ratio" not in output.extras:
            output.extras.update(size_report(output.model, pool.load_model(PRETRAINED)))
        if curve is not None:  # scoring the steps is evaluation, not merging
            result.merge_seconds -= curve.seconds
            result.curve = jsonable(curve.curve)
        result.extras = jsonable(output.extras)
        check_finite_weights(output.model)
        with measure(host.device) as eval_m:
            result.metrics = evaluate_on(host, taskpool, output.model)
        result.eval_seconds = eval_m.seconds
        result.mean = primary_mean(result.metrics, result.primary_metrics)
    except Exception as exc:  # the grid goes on; the error is kept with the cell
        fail(result, exc)
    finally:
        try:
            metrics_logger.summary(
                {"status": result.status, "error": result.error, "metrics": result.metrics, "mean": result.mean,
                 "merge_seconds": result.merge_seconds, "eval_seconds": result.eval_seconds,
                 "peak_memory_mb": result.peak_memory_mb, "versions": result.versions, "extras": result.extras})
        except Exception as exc:  # a logger's failure is reported, never the cell's
            log.warning("a logger failed to record the outcome of %s: %s", cell.label, exc)
        finally:
            metrics_logger.close()
    return result


def reference_blank(host: CellHost, pool_name: str, taskpool_name: str, label: str, seed: int = 0) -> CellResult:
    return CellResult("reference", label, {}, pool_name, taskpool_name, seed, host.options.limit,
                      versions=environment_versions(), identity=host.identity(pool_name, taskpool_name))


def run_reference(host: CellHost, pool_name: str, taskpool_name: str, label: str, seed: int = 0) -> CellResult:
    """Compute one reference row: the pretrained model, each expert on its own task ("individual"), one model of an
    independent pool ("model NAME"), or the best of them ("best model")."""
    result = reference_blank(host, pool_name, taskpool_name, label, seed)
    try:
        pool, taskpool = seeded_pool(host.modelpool(pool_name), seed), host.taskpool(taskpool_name)
        result.primary_metrics = primary_metrics(taskpool, taskpool.tasks)
        with measure(host.device) as m:
            if label == "individual":
                result.metrics = {}
                for expert in pool.expert_names:
                    if pool.task_of(expert) in taskpool.tasks:
                        result.metrics.update(evaluate_on(host, taskpool, pool.load_model(expert),
                                                          [pool.task_of(expert)]))
            elif label == "best model":  # the model with the best mean test score, as papers report it
                scores = [evaluate_on(host, taskpool, pool.load_model(n)) for n in pool.expert_names]
                best = max(range(len(scores)), key=lambda i: primary_mean(scores[i], result.primary_metrics) or 0.0)
                result.metrics = scores[best]
                result.extras = {"model": pool.expert_names[best]}
            else:
                name = PRETRAINED if label == "pretrained" else label.removeprefix("model ")
                result.metrics = evaluate_on(host, taskpool, pool.load_model(name))
        result.eval_seconds = m.seconds
        result.mean = primary_mean(result.metrics, result.primary_metrics)
    except Exception as exc:
        fail(result, exc)
    return result


def evaluate_on(host: CellHost, taskpool: TaskPool, model: Any, tasks: Sequence[str] | None = None) -> Metrics:
    return evaluate(taskpool, model, tasks=tasks, limit=host.options.limit, device=host.device,
                    batch_size=host.options.batch_size, progress=host.progress)


def seeded_pool(pool: ModelPool, seed: int) -> ModelPool:
    """The pool a cell of seed `seed` uses: pools whose models are drawn per seed (independent pools trained from
    pool seed s) implement `for_seed(seed)`; others are the same for every seed."""
    for_seed = getattr(pool, "for_seed", None)
    return pool if for_seed is None else for_seed(seed)


def fail(result: CellResult, exc: BaseException) -> None:
    log.error("%s on %s failed: %s", result.method, result.modelpool, exc)
    result.status = "failed"
    result.error = f"{type(exc).__name__}: {exc}"
    result.traceback = traceback.format_exc()


def environment_versions() -> dict[str, str]:
    out = {}
    for dist in ("mergebench", "torch", "transformers"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        if version:
            out[dist] = version
    return out


def code_version(reg: Registration) -> str:
    return f"{reg.distribution or reg.plugin}=={reg.version}"


def jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return value
