"""Cells as Ray tasks: the same grid, on a local Ray or on a cluster (`--executor ray [--ray-address ADDR]`).

The driver plans, checks and stores exactly as with local workers; only the cells travel, as picklable descriptions
(method name, parameters, pool names, seed, preference as given). A Ray worker rebuilds the cell from the plugins
installed on its node, with the function the runner hands this executor, and returns the row, which the driver stores
the moment it arrives. Each task asks for one CPU, and one GPU when the run's device is CUDA.

What workers must be able to reach: the plugins (installed on every node, same versions: the row records them) and
the pools. Pools are found through each node's `MERGEBENCH_CACHE`: point it at a shared filesystem and every node
reads the same built pools, trained models and statistics; otherwise each node builds its own copy (the embedded
pools are deterministic, so the numbers are the same; CLIP and text pools need their Hugging Face cache on every
node, `mergebench download` there). The driver alone writes results; training curves are written beside the store's
path on the worker's filesystem (the same place when it is shared).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mergebench_core.results.store import CellResult
from mergebench_core.running.executors import Job, failed

log = logging.getLogger(__name__)


class RayExecutor:
    """Sends each job to Ray as a task and yields rows as they finish; a task past `timeout` is cancelled.

    `work(*context, spec)` computes a row from a job's description (`Job.spec`) on a worker: the runner passes its
    own (`runner.run_spec`, with the run's options as `context`), so this module needs nothing of the runner's. It
    must be a module-level function (Ray ships it to every worker by name) and `context` picklable."""

    def __init__(self, work: Callable[..., CellResult], context: tuple[Any, ...] = (), *, gpu: bool = False,
                 address: str | None = None, timeout: float | None = None):
        import ray

        self.timeout, self.context = timeout, context
        self.started_ray = not ray.is_initialized()
        """True when this executor started (or connected to) Ray itself: it then shuts Ray down when its run ends
        (finished, failed or interrupted), so no local Ray processes (raylet, monitors) outlive the grid. A Ray the
        caller started stays up."""
        if self.started_ray:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        resources: dict[str, Any] = {"num_cpus": 1}
        if gpu:
            resources["num_gpus"] = 1
        self.remote = ray.remote(**resources)(work)

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, CellResult]]:
        import ray

        try:
            yield from self._run(ray, jobs)
        finally:
            if self.started_ray:
                _shutdown(ray)

    def _run(self, ray: Any, jobs: Iterable[Job]) -> Iterator[tuple[Job, CellResult]]:
        started = {self.remote.remote(*self.context, job.spec): (job, time.monotonic()) for job in jobs}
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
