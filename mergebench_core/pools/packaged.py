"""Files that ship inside ordinary packages of the package registry (weights, data), checked before use.

Real weights and data reach an offline machine as pinned distributions from the package registry. A `Source` names
one of them and the files a pool reads from it, with their SHA-256. A package is found without importing it
(`importlib.util.find_spec`: some import heavy or absent dependencies at import time, and none of their code is
needed), every file is checked against its digest before a byte of it is used, and a file that is missing, swapped,
edited, or a link out of the package is refused with a `ResourceError` naming the file, the package, and the pip
command that puts the right one back. A folder of many files has one digest over every file's relative path and
digest, in sorted order (`tree_sha256`). A file too large for one wheel, shipped as parts in several distributions,
is joined by `verified_join`, which checks each part and the whole.

Pools keep their own tuple of sources (their pins and digests) and call these functions with it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mergebench_core.engine.checkpoint_files import resolves_inside
from mergebench_core.errors import MergebenchError
from mergebench_core.locks import build_lock, unique_temp

__all__ = ["ResourceError", "Source", "file_sha256", "install_command", "missing", "package_folder", "tree_sha256",
           "verified_file", "verified_join", "verified_tree"]


class ResourceError(MergebenchError):
    """A package a pool reads is missing, or one of its files is not the file the pool was built on."""


@dataclass(frozen=True)
class Source:
    """A pinned distribution and the files a pool reads from it (relative to its import package)."""

    distribution: str
    version: str
    package: str
    what: str
    licence: str
    files: tuple[tuple[str, str], ...] = ()
    """(path, SHA-256) of single files."""
    trees: tuple[tuple[str, str, str], ...] = ()
    """(folder, glob pattern, tree digest) of folders read file by file."""
    no_deps: bool = False
    """Installed with `--no-deps` (its declared dependencies are unrelated or heavy, and the pool needs none)."""

    @property
    def pin(self) -> str:
        return f"{self.distribution}=={self.version}"


def install_command(sources: Sequence[Source]) -> str:
    """The one pip command that installs every source at its pinned version (none of them needs its dependencies)."""
    return "pip install --no-deps " + " ".join(s.pin for s in sources)


def _reinstall(source: Source) -> str:
    return f"pip install --force-reinstall --no-deps {source.pin}"


def package_folder(source: Source) -> Path | None:
    """The installed import package's folder, found without importing it (None when it is not installed)."""
    try:
        spec = importlib.util.find_spec(source.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=64)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (remembered per path, size and modification time within a process)."""
    st = path.stat()
    return _sha256(path, st.st_size, st.st_mtime_ns)


def tree_sha256(folder: Path, pattern: str) -> str:
    """One digest of every file under `folder` matching `pattern`: SHA-256 over "relative path, NUL, file digest,
    newline" in sorted path order (an added, removed, renamed or edited file changes it)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob(pattern), key=lambda p: p.relative_to(folder).as_posix()):
        if path.is_file():
            digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _inside(source: Source, relative: str) -> Path:
    root = package_folder(source)
    if root is None:
        raise ResourceError(f"{source.distribution} is not installed ({source.what}); install it with: "
                            f"{install_command((source,))}")
    path = root / relative
    if not path.exists():
        raise ResourceError(f"{path} is missing from {source.distribution}; reinstall it with: {_reinstall(source)}")
    if not resolves_inside(root, path):
        raise ResourceError(f"{path} leads outside the {source.distribution} package (a link?); refusing to read it. "
                            f"Reinstall it with: {install_command((source,))}")
    return path


def _refuse(source: Source, path: Path, found: str, expected: str) -> ResourceError:
    return ResourceError(
        f"{path} is not the file this pool was built on: its SHA-256 is {found}, expected {expected} "
        f"({source.pin}). Reinstall the pinned version with: {_reinstall(source)}")


def verified_file(source: Source, relative: str) -> Path:
    """The path of one of `source`'s files, after checking its digest."""
    expected = dict(source.files)[relative]
    path = _inside(source, relative)
    found = file_sha256(path)
    if found != expected:
        raise _refuse(source, path, found, expected)
    return path


def verified_tree(source: Source, folder: str) -> Path:
    """The path of one of `source`'s folders, after checking the digest over its files."""
    pattern, expected = next((p, d) for f, p, d in source.trees if f == folder)
    path = _inside(source, folder)
    found = tree_sha256(path, pattern)
    if found != expected:
        raise _refuse(source, path, found, expected)
    return path


def verified_join(parts: Sequence[tuple[Source, str]], expected: str, target: Path) -> Path:
    """`target`, the concatenation of `parts` ((source, file) in order, each checked by its own digest), whose
    SHA-256 must be `expected`. Built once under a lock and renamed into place; an existing `target` is checked and
    rebuilt when it is not the expected file. Packages split a file this way when it is larger than one wheel."""
    target = Path(target)
    if target.is_file() and file_sha256(target) == expected:
        return target
    paths = [verified_file(source, relative) for source, relative in parts]  # every part, before any work
    target.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(target, f"joining {target.name}"):
        if target.is_file() and file_sha256(target) == expected:
            return target
        temp = unique_temp(target)
        digest = hashlib.sha256()
        try:
            with open(temp, "wb") as out:
                for path in paths:
                    with open(path, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            digest.update(chunk)
                            out.write(chunk)
            if digest.hexdigest() != expected:
                pins = ", ".join(sorted({s.pin for s, _ in parts}))
                raise ResourceError(f"the parts of {target.name} ({pins}) join to SHA-256 {digest.hexdigest()}, "
                                    f"expected {expected}; reinstall them with: "
                                    f"{install_command(list(dict.fromkeys(s for s, _ in parts)))}")
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
    return target


def missing(sources: Sequence[Source]) -> list[str]:
    """What is not installed (a cheap check for `missing_resources`: digests are checked when files are read)."""
    absent = [s for s in sources if package_folder(s) is None]
    return [f"{s.distribution} ({s.what}): {install_command(tuple(absent))}" for s in absent]
