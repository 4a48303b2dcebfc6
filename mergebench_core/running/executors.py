"""Where cells run: in a fresh worker process each (the default), in this process, or as Ray tasks.

A cell runs third-party research code, so it must not be able to hurt the grid: a method that changes a task pool's
heads in place, sets torch's default dtype, calls `sys.exit`, `os._exit` or segfaults, or hangs. Each cell therefore
runs in a worker forked from the driver just for it: the worker starts with the driver's imports and pool objects,
warm (the driver has already scored the reference rows, so data, heads and libraries are loaded: no interpreter start,
no plugin import), and whatever it changes dies with it. A fresh fork per cell costs milliseconds; reusing workers
would save little and would need every change a cell can make to global state to be detected.
The driver alone writes the store, as each result arrives. A worker that dies, or runs past the cell timeout, is
turned into a failed row naming the exit code, the signal or the timeout, and the grid goes on; a worker killed by a
fatal signal (a segfault in a library) has faulthandler's Python stack written to a file of its own, stored as the
row's traceback rather than spilled over the terminal. A worker never outlives its driver, and owns its progress-bar
lock (`worker_setup`).

`fork` exists on Linux and macOS; elsewhere cells run in the driver's process (`InProcessExecutor`), as they also do
with `--isolation none` (for a debugger).
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import IO, Any

import torch

from mergebench_core.results.store import CellResult
from mergebench_core.running.worker_setup import die_with_parent, own_progress_lock

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


def _child(conn: Connection, work: Callable[[], CellResult], threads: int, driver: int, crash_log: IO[bytes]) -> None:
    """The worker: run one job, send the row (or what it raised) to the driver, and leave without running the
    driver's exit handlers (inherited by the fork: pytest's, logging's).

    Before the work: die with `driver` (its pid), take a progress-bar lock of its own, and send faulthandler's dump
    of a fatal signal to `crash_log`, which the driver reads if this process dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    die_with_parent(driver)
    own_progress_lock()
    faulthandler.enable(file=crash_log, all_threads=True)
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


def _crash_dump(crash_log: IO[bytes]) -> str | None:
    """What faulthandler wrote when the worker died of a fatal signal (its Python stack), or None."""
    try:
        crash_log.seek(0)
        text = crash_log.read().decode("utf-8", errors="replace").strip()
    except (OSError, ValueError):
        return None
    return text or None


@dataclass
class _Worker:
    """A running worker, as the driver tracks it."""

    job: Job
    process: Any  # multiprocessing's fork-context Process
    started: float
    crash_log: IO[bytes]

    def stop(self) -> None:
        self.process.kill()
        self.process.join()
        self.crash_log.close()


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
        running: dict[Connection, _Worker] = {}
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    job = pending.popleft()
                    receive, send = ctx.Pipe(duplex=False)
                    crash_log = tempfile.TemporaryFile()  # unnamed: gone with its last descriptor
                    process = ctx.Process(target=_child, args=(send, job.work, self.threads, os.getpid(), crash_log),
                                          daemon=True, name=f"mergebench-cell: {job.label}"[:60])
                    process.start()
                    send.close()
                    running[receive] = _Worker(job, process, time.monotonic(), crash_log)
                for conn in wait(list(running), timeout=self._wait_time(running)):
                    worker = running.pop(conn)
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):
                        message = None
                    conn.close()
                    worker.process.join()
                    result = self._result(worker.job, message, worker.process.exitcode, worker.crash_log)
                    worker.crash_log.close()
                    yield worker.job, result
                for conn, worker in list(running.items()):
                    if self.timeout is not None and time.monotonic() - worker.started > self.timeout:
                        worker.stop()
                        conn.close()
                        del running[conn]
                        yield worker.job, failed(worker.job, f"timeout: the cell ran past --cell-timeout "
                                                             f"{self.timeout:g} s and was stopped")
        finally:  # Ctrl-C, or the consumer stopped early: no worker outlives the run
            for conn, worker in running.items():
                worker.stop()
                conn.close()

    def _wait_time(self, running: dict[Connection, _Worker]) -> float | None:
        if self.timeout is None:
            return None
        now = time.monotonic()
        return max(0.0, min(w.started + self.timeout - now for w in running.values()))

    @staticmethod
    def _result(job: Job, message: Any, exitcode: int | None, crash_log: IO[bytes]) -> CellResult:
        if message is None:
            return failed(job, _death(exitcode), _crash_dump(crash_log))
        if message[0] == "ok":
            return message[1]  # type: ignore[no-any-return]
        return failed(job, message[1], message[2])


def can_fork() -> bool:
    return "fork" in mp.get_all_start_methods()
