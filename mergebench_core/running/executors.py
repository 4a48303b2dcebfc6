"""Where cells run: in a fresh worker process each (the default), in this process, or as Ray tasks.

A cell runs third-party research code, so it must not be able to hurt the grid: a method that changes a task pool's
heads in place, sets torch's default dtype, calls `sys.exit`, `os._exit` or segfaults, or hangs. Each cell therefore
runs in a worker forked from the driver just for it: the worker starts with the driver's imports and pool objects,
warm (the driver has already scored the reference rows, so data, heads and libraries are loaded: no interpreter start,
no plugin import), and whatever it changes dies with it. A fresh fork per cell costs milliseconds; reusing workers
would save little and would need every change a cell can make to global state to be detected.
The driver alone writes the store, as each result arrives. A worker that dies, or runs past the cell timeout, is
turned into a failed row naming the exit code, the signal or the timeout, and the grid goes on.

`fork` exists on Linux and macOS; elsewhere cells run in the driver's process (`InProcessExecutor`), as they also do
with `--isolation none` (for a debugger).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from mergebench_core.results.store import CellResult

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One unit of work: a cell or a reference row."""

    label: str
    work: Callable[[], CellResult]
    """Computes the row; runs in the worker."""
    blank: Callable[[], CellResult]
    """The row to store as failed when the worker dies or times out; called in the driver."""
    spec: Any = None
    """A picklable description of the work, for executors on other machines (Ray)."""


def failed(job: Job, error: str, trace: str | None = None) -> CellResult:
    result = job.blank()
    result.status, result.error, result.traceback = "failed", error, trace
    log.error("%s failed: %s", job.label, error)
    return result


class InProcessExecutor:
    """Runs each job in the driver's process, one after another (`--isolation none`, or no `fork`)."""

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, CellResult]]:
        for job in jobs:
            try:
                yield job, job.work()
            except SystemExit as exc:  # a plugin's sys.exit must not end the grid
                yield job, failed(job, f"the cell called sys.exit({exc.code!r})", traceback.format_exc())


WORKER_THREADS_ENV = "MERGEBENCH_WORKER_THREADS"
_FRESH_PROCESS = False
_WORKER_THREADS: int | None = None
"""Threads each worker may use, set by `reserve_threads_for_workers` in a process that has not computed yet."""


def mark_fresh_process() -> None:
    """Called by the console script first thing: nothing has been computed in this process yet."""
    global _FRESH_PROCESS
    _FRESH_PROCESS = True


def reserve_threads_for_workers() -> None:
    """Keep this process (the driver) to one torch thread and give its threads to the workers it forks.

    OpenMP's thread pool does not survive `fork`: a worker that runs a parallel region after its parent has run one
    waits forever for threads that exist only in the parent. `mergebench run` calls this before any computation (in a
    fresh process only), so the driver never starts the pool and each worker can start its own. A process that may
    already have computed with several threads (a notebook, a test session) reserves nothing, and its workers run
    single-threaded, which is always safe.
    """
    global _WORKER_THREADS
    if _FRESH_PROCESS and _WORKER_THREADS is None:
        _WORKER_THREADS = torch.get_num_threads()
        torch.set_num_threads(1)


def _child(conn: Connection, work: Callable[[], CellResult], threads: int) -> None:
    """The worker: run one job, send the row (or what it raised) to the driver, and leave without running the
    driver's exit handlers (inherited by the fork: pytest's, logging's)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    try:
        torch.set_num_threads(threads)
        conn.send(("ok", work()))
    except BaseException as exc:  # SystemExit included: a method that calls sys.exit(0) fails its cell
        what = f"the cell called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else \
            f"{type(exc).__name__}: {exc}"
        try:
            conn.send(("raised", what, traceback.format_exc()))
        except Exception:  # an unpicklable exception: the exit code will tell
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(0)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the worker was killed by {name} ({-exitcode}) before it finished the cell"
    return f"the worker exited with code {exitcode} before it finished the cell (os._exit or a crash in a library)"


class ForkExecutor:
    """A fresh forked worker per job, `jobs` at a time, each killed past `timeout` seconds."""

    def __init__(self, jobs: int = 1, timeout: float | None = None):
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs, self.timeout = jobs, timeout
        wanted = int(os.environ.get(WORKER_THREADS_ENV, "1") or 1)
        self.threads = max(1, min(wanted, _WORKER_THREADS)) if _WORKER_THREADS else 1
        """torch threads per worker: one unless `MERGEBENCH_WORKER_THREADS` asks for more (and the driver reserved
        them, see `reserve_threads_for_workers`). One thread gives the same bits whatever `--jobs` is (a float sum
        split over threads rounds differently), and measured on 2 shared cores the grid ran 7x faster with one thread
        per worker than with two (OpenMP's waiting threads compete with every other process)."""

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, CellResult]]:
        ctx = mp.get_context("fork")
        pending = deque(jobs)
        running: dict[Connection, tuple[Job, Any, float]] = {}
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    job = pending.popleft()
                    receive, send = ctx.Pipe(duplex=False)
                    process = ctx.Process(target=_child, args=(send, job.work, self.threads), daemon=True,
                                          name=f"mergebench-cell: {job.label}"[:60])
                    process.start()
                    send.close()
                    running[receive] = (job, process, time.monotonic())
                for conn in wait(list(running), timeout=self._wait_time(running)):
                    job, process, _ = running.pop(conn)
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):
                        message = None
                    conn.close()
                    process.join()
                    yield job, self._result(job, message, process.exitcode)
                for conn, (job, process, started) in list(running.items()):
                    if self.timeout is not None and time.monotonic() - started > self.timeout:
                        process.kill()
                        process.join()
                        conn.close()
                        del running[conn]
                        yield job, failed(job, f"timeout: the cell ran past --cell-timeout {self.timeout:g} s and "
                                               f"was stopped")
        finally:  # Ctrl-C, or the consumer stopped early: no worker outlives the run
            for conn, (_, process, _) in running.items():
                process.kill()
                process.join()
                conn.close()

    def _wait_time(self, running: dict[Connection, tuple[Job, Any, float]]) -> float | None:
        if self.timeout is None:
            return None
        now = time.monotonic()
        return max(0.0, min(started + self.timeout - now for _, _, started in running.values()))

    @staticmethod
    def _result(job: Job, message: Any, exitcode: int | None) -> CellResult:
        if message is None:
            return failed(job, _death(exitcode))
        if message[0] == "ok":
            return message[1]  # type: ignore[no-any-return]
        return failed(job, message[1], message[2])


def can_fork() -> bool:
    return "fork" in mp.get_all_start_methods()
