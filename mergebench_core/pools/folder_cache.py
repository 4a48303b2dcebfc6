"""Cached folders: things built once that only exist as a folder of files (a Hugging Face model folder, a peft
adapter), keyed by a JSON recipe like `ContentCache` entries, which hold tensors in one file.

An entry is `<root>/<kind>/<digest of the key>/`. It is built in a temporary sibling folder under a lock and renamed
into place only when complete, beside a manifest (`mergebench-entry.json`) holding the key and the SHA-256 of every
file. A read trusts nothing it has not checked: a folder whose manifest names another key, or whose files are not
the ones listed (missing, edited, truncated), is logged and rebuilt. Digests are computed once per file, size and
modification time in a process (`packaged.file_sha256`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from mergebench_core.cache import Key, canonical_json, key_digest
from mergebench_core.locks import build_lock, unique_temp
from mergebench_core.pools.packaged import file_sha256

__all__ = ["MANIFEST", "cached_folder", "folder_problem"]

log = logging.getLogger(__name__)

MANIFEST = "mergebench-entry.json"


def folder_problem(folder: Path, key: Key) -> str | None:
    """Why `folder` is not the complete entry for `key` (None when it is)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (never completed)"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if data.get("key") != canonical_json(key):
        return "built for another key"
    for name, digest in data.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} is not the file that was written (SHA-256 differs)"
    return None


def cached_folder(root: Path, kind: str, key: Key, build: Callable[[Path], None], what: str) -> Path:
    """The folder of the entry `key` under `root/kind`, built by `build(folder)` (which writes files into the empty
    folder it is given) when it is missing or damaged."""
    target = Path(root) / kind / key_digest(key)
    if folder_problem(target, key) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(target, what):
        problem = folder_problem(target, key)
        if problem is None:
            return target
        if target.exists():
            log.warning("%s at %s is rebuilt: %s", what, target, problem)
        temp = unique_temp(target)
        temp.mkdir()
        try:
            build(temp)
            files = {p.relative_to(temp).as_posix(): file_sha256(p) for p in sorted(temp.rglob("*")) if p.is_file()}
            (temp / MANIFEST).write_text(json.dumps({"key": canonical_json(key), "files": files}, indent=1))
            if target.exists():
                shutil.rmtree(target)
            temp.rename(target)
        finally:
            if temp.exists():
                shutil.rmtree(temp)
    return target
