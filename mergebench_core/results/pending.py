"""Where a computed result waits when the results store cannot take it (locked too long, disk full, read-only).

A result is kept beside the store, in `<store>.pending/`; when that folder cannot be written either (the disk that
holds the store is full), in the temporary folder, under a folder named after the store. The next writable open of
the store reads both places, so a result kept aside is added whichever place took it, and never to another store.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from mergebench_core.locks import write_text_atomic

TEMP_FOLDER = "mergebench-pending"
"""The temporary folder's subfolder that holds kept results, one folder per store."""


def pending_dir(path: str | os.PathLike[str]) -> Path:
    """Where results that could not be written to the store at `path` are kept until the next writable open."""
    path = Path(path)
    return path.with_name(f"{path.name}.pending")


def temp_pending_dir(path: str | os.PathLike[str]) -> Path:
    """The fallback for `pending_dir`, in the temporary folder: named after the store's file name and a digest of its
    absolute path, so two stores of the same name never take each other's results."""
    path = Path(path).resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / TEMP_FOLDER / f"{path.name}-{digest}"


def keep_aside(path: str | os.PathLike[str], name: str, text: str) -> Path:
    """Write `text` as `name` in the store's pending folder, else in its temporary fallback; the file's absolute
    path. `OSError` when neither can be written."""
    try:
        return write_text_atomic(pending_dir(path) / name, text).resolve()
    except OSError:
        return write_text_atomic(temp_pending_dir(path) / name, text).resolve()


def pending_folders(path: str | os.PathLike[str]) -> list[Path]:
    """The folders that may hold results kept aside for the store at `path`, those that exist."""
    return [folder for folder in (pending_dir(path), temp_pending_dir(path)) if folder.is_dir()]
