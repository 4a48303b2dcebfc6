"""Cells as Ray tasks: the same grid, on a local Ray or on a cluster (`--executor ray [--ray-address ADDR]`).

The driver plans, checks and stores exactly as with local workers; only the cells travel, as picklable descriptions
(method name, parameters, pool names, seed, preference as given). A Ray worker rebuilds the cell from the plugins
installed on its node and returns the row, which the driver stores the moment it arrives. Each task asks for one CPU,
and one GPU when the run's device is CUDA.

What workers must be able to reach: the plugins (installed on every node, same versions: the row records them) and
the pools. Pools are found through each node's `MERGEBENCH_CACHE`: point it at a shared filesystem and every node
reads the same built pools, trained models and statistics; otherwise each node builds its own copy (the embedded
pools are deterministic, so the numbers are the same; CLIP and text pools need their Hugging Face cache on every
node, `mergebench download` there). The driver alone writes results; training curves are written beside the store's
path on the worker's filesystem (the same place when it is shared).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebench_core.contract.config import field_types, instantiate_params
from mergebench_core.running.executors import Job, failed
from mergebench_core.preferences.vectors import validate
from mergebench_core.results.store import CellResult

if TYPE_CHECKING:
    from mergebench_core.running.runner import Runner, RunOptions

log = logging.getLogger(__name__)


def run_spec(options: RunOptions, store_path: str | None, spec: tuple[Any, ...]) -> CellResult:
    """Rebuild a cell (or reference row) from its description with this node's plugins, and compute it."""
    from mergebench_core.contract.registry import get_registry
    from mergebench_core.running.runner import Cell, Runner

    runner = Runner(get_registry(), None, options)
    if store_path is not None:  # training curves go beside the store's path, on the worker's filesystem
        runner.logger_set.store_path = Path(store_path)
    if spec[0] == "reference":
        _, pool, taskpool, label, *seed = spec  # the seed: for pools whose models depend on it (`for_seed`)
        return runner.reference(pool, taskpool, label, *seed)
    _, method, params, modelpool, taskpool, seed, given = spec
    reg = runner.registry.method_registration(method)
    values = instantiate_params(method, reg.obj.Params, params, [], field_types(reg.obj.Params))
    preference = validate(given, runner.taskpool(taskpool).tasks) if given is not None else None
    return runner.run_cell(Cell(reg.name, reg.obj, reg, values, modelpool, taskpool, seed, preference))


class RayExecutor:
    """Sends each job to Ray as a task and yields rows as they finish; a task past `timeout` is cancelled."""

    def __init__(self, runner: Runner, address: str | None = None, timeout: float | None = None):
        import ray

        self.runner, self.timeout = runner, timeout
        self.started_ray = not ray.is_initialized()
        """True when this executor started (or connected to) Ray itself: it then shuts Ray down when its run ends
        (finished, failed or interrupted), so no local Ray processes (raylet, monitors) outlive the grid. A Ray the
        caller started stays up."""
        if self.started_ray:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        resources: dict[str, Any] = {"num_cpus": 1}
        if runner.device.type == "cuda":
            resources["num_gpus"] = 1
        self.remote = ray.remote(**resources)(run_spec)

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, CellResult]]:
        import ray

        options = dataclasses.replace(self.runner.options, executor="local",
                                      bn_stats=self.runner.bn_stats)  # a config file's bn_stats: too
        store = self.runner.store
        store_path = str(store.path) if store is not None else None
        try:
            yield from self._run(ray, options, store_path, jobs)
        finally:
            if self.started_ray:
                _shutdown(ray)

    def _run(self, ray: Any, options: RunOptions, store_path: str | None,
             jobs: Iterable[Job]) -> Iterator[tuple[Job, CellResult]]:
        started = {self.remote.remote(options, store_path, job.spec): (job, time.monotonic()) for job in jobs}
        while started:
            done, _ = ray.wait(list(started), num_returns=1, timeout=1.0)
            for ref in done:
                job, _ = started.pop(ref)
                try:
                    yield job, ray.get(ref)
                except Exception as exc:  # a worker that crashed or a task that raised outside the cell
                    yield job, failed(job, f"the Ray task failed: {type(exc).__name__}: {exc}")
            if self.timeout is not None:
                for ref, (job, t0) in list(started.items()):
                    if time.monotonic() - t0 > self.timeout:
                        ray.cancel(ref, force=True)
                        del started[ref]
                        yield job, failed(job, f"timeout: the cell ran past --cell-timeout {self.timeout:g} s and "
                                               f"was stopped")


def _shutdown(ray: Any) -> None:
    """Shut down the Ray this run started (a no-op if something else already did)."""
    if ray.is_initialized():
        log.info("shutting down the Ray this run started")
        ray.shutdown()
