"""Safe cache builds when several processes share a cache: file locks, unique temporary names, atomic writes.

Every cache build (a pool's checkpoints, a statistic, a trained model) follows one pattern:

    if not valid(target):                       # the common case: already built, no lock taken
        with build_lock(target, "the digits pool"):
            if not valid(target):               # another process may have built it while this one waited
                build(target)                   # every file written under a unique temporary name, then renamed

so two processes building the same entry at once compute it once, and a reader never sees a half-written file. The
locks are the maintained `filelock` package's (`fcntl` on POSIX): a process that dies releases its lock, so there
are no stale locks to clean up by hand. A cache that is already built is read without any lock, so a read-only
shared cache works.

A lock file is never deleted on release. With `fcntl` locks that would be unsafe: a process waiting on the old file
takes the lock of an unlinked file just as a newcomer creates a new file at the same path and locks that one, and
both build at once. So the lock files stay; the content cache (`mergebench_core.cache`) keeps its own in one
`locks/` folder, so that the folders of its entries hold entries only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WAIT_NOTICE_SECONDS = 5.0
"""After this long waiting for another process's build, say so (once), then keep waiting."""


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file that guards `target` (a file or a folder): a hidden sibling, `.NAME.lock`."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


def unique_temp(target: str | os.PathLike[str]) -> Path:
    """A temporary sibling of `target` that no other process or writer uses (pid and random bytes in the name), so
    concurrent writers of the same file never share or delete each other's partial bytes."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}-{os.urandom(4).hex()}.partial")


@contextmanager
def build_lock(target: str | os.PathLike[str], what: str = "",
               lock_file: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Hold the lock that guards building `target`; waits as long as another process's build takes, saying so
    once after `WAIT_NOTICE_SECONDS`. The lock is released when the block ends or the process dies.

    The lock lives in `lock_file` when given (every process building `target` must then name the same one), else in
    `lock_path(target)`."""
    from filelock import FileLock, Timeout

    path = Path(lock_file) if lock_file is not None else lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=WAIT_NOTICE_SECONDS)
    except Timeout:
        log.info("waiting for another process that is building %s (lock %s)", what or Path(target).name, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temp(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """The JSON in `path`, or None when it is missing, torn or not JSON (logged: the caller rebuilds it)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("%s is unreadable or torn (%s); rebuilding what it describes", path, exc)
        return None


def safetensors_intact(paths: list[Path]) -> bool:
    """True when every file exists and its safetensors header is valid and fits the file (a cheap check, no tensor
    data is read): a truncated or missing checkpoint makes its cache entry be rebuilt."""
    from mergebench_core.engine.safetensors_format import read_safetensors_header
    from mergebench_core.errors import CheckpointError

    for path in paths:
        try:
            read_safetensors_header(path)
        except (CheckpointError, OSError) as exc:
            log.warning("cached file %s is missing or damaged (%s); rebuilding", path, str(exc).splitlines()[0])
            return False
    return True
