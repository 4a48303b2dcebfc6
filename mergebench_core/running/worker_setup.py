"""What a forked worker does before it runs its cell, so that neither its death nor its driver's can hurt the grid.

A worker is forked from the driver and inherits everything the driver holds, including two things that cross process
boundaries and outlive the fork:

- **Progress-bar locks.** tqdm guards its bars with a multiprocessing lock in shared memory, created by the driver's
  first bar and inherited by every worker. A worker killed while it holds that lock (a `kill -9`, the cell timeout,
  the out-of-memory killer) leaves it held forever, and every later worker blocks on its first progress bar. Each
  worker therefore gets a lock of its own: its bars are its own business, and the driver keeps its own lock.
- **Its driver.** A killed driver does not take its forked workers with it: they would keep training for the rest
  of their cell and write cache files nobody asked for. On Linux the kernel sends the worker SIGKILL when the driver
  dies (`prctl(PR_SET_PDEATHSIG)`); elsewhere a watcher thread notices that the worker's parent changed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
"""`prctl` option from <linux/prctl.h>: the signal this process gets when the thread that forked it ends."""
PARENT_POLL_SECONDS = 0.25
"""How often the portable fallback checks whether the driver is still the worker's parent."""


def own_progress_lock() -> None:
    """Give this process's progress bars a lock of their own, dropping the one inherited from the driver.

    Every tqdm class that carries a lock (the base class, and any subclass that was given its own) gets one fresh
    re-entrant thread lock: workers no longer share a lock that a dead worker can leave held. Without tqdm imported
    there is nothing inherited to replace."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    lock = threading.RLock()
    classes, seen = [std.tqdm], set()
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if cls is std.tqdm or "_lock" in vars(cls):
            cls.set_lock(lock)
        classes.extend(cls.__subclasses__())


def die_with_parent(parent: int) -> None:
    """Make this process end when `parent` (the driver that forked it) ends.

    `parent` is the driver's pid as the driver saw it before forking: if the driver has already died, `getppid()`
    no longer returns it, and this process ends at once instead of waiting for a signal that was sent before it
    asked for one."""
    if not _ask_kernel(parent):
        threading.Thread(target=_watch_parent, args=(parent,), name="mergebench-driver-watch", daemon=True).start()
    if os.getppid() != parent:  # the driver died before the request took effect
        _end()


def _ask_kernel(parent: int) -> bool:
    """Linux: ask for SIGKILL when the driver dies. False where that is not available (the caller then watches)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError) as exc:  # no libc prctl (an unusual libc): fall back to watching
        log.debug("prctl(PR_SET_PDEATHSIG) is not available (%s); watching the driver instead", exc)
        return False
    if not done:
        log.debug("prctl(PR_SET_PDEATHSIG) failed (errno %d); watching the driver instead", ctypes.get_errno())
    return done


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    _end()


def _end() -> None:
    """End this worker the way the kernel would: no exit handlers, no flushing of files half written."""
    os.kill(os.getpid(), signal.SIGKILL)
