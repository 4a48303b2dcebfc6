"""One content-addressed cache for everything mergebench computes once and reuses: data statistics, activations,
trained models, and the mergeability plugin's features.

Each entry is a named set of tensors plus a small JSON manifest, found by a JSON key, in one safetensors file. The
file is named by a hash of the key, and it also holds the key itself, the manifest, and a digest of everything in it
(blake2b over the key, the manifest, and every tensor's name, dtype, shape and bytes). A read trusts nothing it has
not checked:

- a file stored under another key (a hash collision, a hand-copied or hand-edited file, an older code version in the
  key) is a miss;
- a file whose bytes do not match its digest (flipped bits behind a valid header, a partial copy) is logged, naming
  the file, and rebuilt: a silently damaged trained model once scored 16 % instead of 96 % with exit status 0;
- a file written before this format (no digest) is rebuilt too.

Writes follow `locks`: one lock per entry, a second look after taking it (two processes building one entry build it
once), a temporary name in the entry's folder, fsync, then a rename, so a reader sees the whole old file or the whole
new one. Non-finite values are refused before anything is written, and every write error (disk full, a read-only
folder) says which path failed. Reads take no lock, so a read-only shared cache works.

The lock files live apart, under `locks/` in the cache's folder (`lock_file`): deleting one on release is not safe
with `filelock` (see `locks`), so they stay, and keeping them in one place leaves the entries' folders with entries
only.

`ContentCache` is the whole mechanism; `StatsCache` (`data.statistics`) and `TrainedModelCache` (`training.methods`)
are thin clients that choose the key and the file name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergebench_core.engine.safetensors_writer import StreamingSafetensorsWriter
from mergebench_core.errors import MergebenchError
from mergebench_core.locks import build_lock, unique_temp

log = logging.getLogger(__name__)

CACHE_FORMAT = "2"
"""The layout of an entry's metadata. Format 1 (no digest) entries are rebuilt on first read."""

LOCKS_FOLDER = "locks"
"""The folder below a cache's root that holds the lock files of its entries."""

FORMAT_FIELD, KEY_FIELD, MANIFEST_FIELD, DIGEST_FIELD = (
    "mergebench.cache_format", "mergebench.key", "mergebench.manifest", "mergebench.digest")

Key = Mapping[str, Any]
"""What identifies an entry: a JSON object (str, int, float, bool, None, lists and objects of those)."""


class CacheWriteError(MergebenchError):
    """An entry could not be stored: a write failed (disk full, read-only folder) or its values are not finite."""


@dataclass(frozen=True)
class Entry:
    """The content of one cache entry: named tensors and a small JSON manifest (either may be empty)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def canonical_json(value: Any, what: str = "cache key") -> str:
    """`value` as sorted JSON: the one spelling that is hashed and stored, so equal keys give equal files."""
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} {value!r} is not JSON ({exc}); use str, int, float, bool, None, lists and "
                        f"objects of those") from None


def key_digest(key: Key) -> str:
    """The name-part of the file of `key`: 24 hex digits of the SHA-256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:24]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor without a copy when it is contiguous (bfloat16 included: numpy lacks it)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def content_digest(key_json: str, manifest_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """blake2b over the key, the manifest and each tensor's name, dtype, shape and bytes, in name order (so the
    order tensors are stored or read in does not matter)."""
    h = hashlib.blake2b(digest_size=32)
    for text in (CACHE_FORMAT, key_json, manifest_json):
        h.update(text.encode())
        h.update(b"\0")
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def non_finite(tensors: Mapping[str, torch.Tensor]) -> str:
    """'' when every floating-point value is finite, else how many are not and which tensor holds the most."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if not bad:
        return ""
    worst = max(bad, key=bad.__getitem__)
    return f"{sum(bad.values())} non-finite values ({bad[worst]} in tensor {worst!r})"


class ContentCache:
    """A folder of entries, each one safetensors file found by its key (see the module's docstring).

    Subclasses choose where an entry lives by overriding `entry_name`; `hits` and `misses` count what
    `get_or_build` found, for benchmarks and tests.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self._reported: set[tuple[Path, int, int]] = set()
        self._verified: set[tuple[Path, int, int]] = set()

    def entry_name(self, key: Key, digest: str) -> str:
        """The entry's path below `root`, without the suffix (a subclass may group entries in folders)."""
        return digest

    def entry_path(self, key: Key) -> Path:
        return self.root / f"{self.entry_name(key, key_digest(key))}.safetensors"

    def lock_file(self, path: Path) -> Path:
        """The lock file of the entry at `path`: the entry's path below `root`, under `locks/`, plus `.lock`."""
        try:
            relative = Path(path).relative_to(self.root)
        except ValueError:
            raise ValueError(f"{path} is not an entry of the cache at {self.root}") from None
        return self.root / LOCKS_FOLDER / relative.with_name(f"{relative.name}.lock")

    def is_valid(self, key: Key, what: str = "cache entry") -> bool:
        """Whether `get(key)` would return the entry: it exists, is stored under `key` in this format, and its data
        matches its digest. Planning asks this before running anything (`--eval-only`), so a damaged or old file
        counts as missing there, not later. A file state once verified is not read again by this object."""
        path = self.entry_path(key)
        if _file_state(path) in self._verified:
            return True
        return self.get(key, what) is not None

    def get(self, key: Key, what: str = "cache entry") -> Entry | None:
        """The entry stored under `key`, or None when there is none or it cannot be trusted (logged, naming the
        file, so the caller rebuilds it). `what` names the entry in messages."""
        from safetensors import safe_open

        path = self.entry_path(key)
        if not path.is_file():
            return None
        key_json = canonical_json(key)
        try:
            with safe_open(str(path), framework="pt") as fh:  # type: ignore[no-untyped-call]
                meta = fh.metadata() or {}
                problem = _metadata_problem(meta, key_json)
                if problem:
                    self._report(path, what, problem)
                    return None
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            manifest_json = meta[MANIFEST_FIELD]
            manifest = json.loads(manifest_json)
        except Exception as exc:  # a torn or corrupt file is rebuilt, never trusted
            self._report(path, what, f"it cannot be read ({str(exc).splitlines()[0] if str(exc) else exc!r})")
            return None
        if content_digest(key_json, manifest_json, tensors) != meta[DIGEST_FIELD]:
            self._report(path, what, "its data does not match its digest (damaged on disk)")
            return None
        self._verified.add(_file_state(path))
        return Entry(tensors, manifest)

    def put(self, key: Key, entry: Entry, what: str = "cache entry") -> Path:
        """Store `entry` under `key` (replacing what was there) and return its path. Non-finite values and write
        errors raise `CacheWriteError` naming the entry and the path; nothing partial is left behind."""
        path = self.entry_path(key)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in entry.tensors.items()}
        bad = non_finite(tensors)
        if bad:
            raise CacheWriteError(f"{what} came out with {bad}; not cached (it would have been {path})")
        key_json, manifest_json = canonical_json(key), canonical_json(entry.manifest, f"manifest of {what}")
        metadata = {FORMAT_FIELD: CACHE_FORMAT, KEY_FIELD: key_json, MANIFEST_FIELD: manifest_json,
                    DIGEST_FIELD: content_digest(key_json, manifest_json, tensors)}
        layout = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
        tmp = unique_temp(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with StreamingSafetensorsWriter(tmp, layout, metadata) as writer:
                for k, v in tensors.items():
                    writer.write(k, v)
                writer.commit()
            _fsync(tmp)
            os.replace(tmp, path)
        except OSError as exc:
            with suppress(OSError):  # a folder that cannot be created has no temporary file to remove
                tmp.unlink()
            raise CacheWriteError(_write_failure(what, path, exc)) from exc
        _fsync_folder(path.parent)
        self._verified.add(_file_state(path))
        return path

    def get_or_build(self, key: Key, build: Callable[[], Entry], what: str = "cache entry") -> Entry:
        """The entry under `key`; when there is none (or it cannot be trusted), `build()` it once under the entry's
        lock (another process building it meanwhile is waited for and its result read) and store it."""
        found = self.get(key, what)
        if found is None:
            path = self.entry_path(key)
            with self.lock(path, what):
                found = self.get(key, what)  # another process may have built it while this one waited
                if found is None:
                    self.misses += 1
                    log.info("building %s", what)
                    built = build()
                    self.put(key, built, what)
                    return built
        self.hits += 1
        log.debug("%s: cache hit", what)
        return found

    @contextmanager
    def lock(self, path: Path, what: str) -> Iterator[None]:
        """`locks.build_lock` for the entry at `path`; failing to take it (a read-only folder) names the lock file."""
        with self.locked([path], what):
            yield

    @contextmanager
    def locked(self, paths: Sequence[Path], what: str) -> Iterator[None]:
        """Hold the locks of several entries at once, for a build that makes them together (one forward pass, many
        activations). They are taken in sorted order, so two processes wanting overlapping sets cannot deadlock."""
        with ExitStack() as stack:
            for path in sorted(set(paths)):
                lock_file = self.lock_file(path)
                try:
                    stack.enter_context(build_lock(path, what, lock_file=lock_file))
                except OSError as exc:
                    raise CacheWriteError(_write_failure(f"the lock of {what}", lock_file, exc)) from exc
            yield

    def _report(self, path: Path, what: str, problem: str) -> None:
        """Warn once per state of the file (its mtime and size): a caller that looks before and after taking the
        lock does not repeat the warning."""
        seen = _file_state(path)
        if seen in self._reported:
            log.debug("%s at %s: %s (already reported)", what, path, problem)
            return
        self._reported.add(seen)
        log.warning("cached %s at %s is not used: %s; rebuilding it", what, path, problem)


def _file_state(path: Path) -> tuple[Path, int, int]:
    """`path` with its mtime and size: a file rewritten since (rebuilt, damaged by hand) is a new state."""
    try:
        stat = path.stat()
        return (path, stat.st_mtime_ns, stat.st_size)
    except OSError:
        return (path, 0, 0)


def _metadata_problem(meta: Mapping[str, str], key_json: str) -> str:
    """Why metadata `meta` does not describe an entry of this format stored under `key_json` ('' when it does)."""
    if meta.get(FORMAT_FIELD) != CACHE_FORMAT or DIGEST_FIELD not in meta or MANIFEST_FIELD not in meta:
        return (f"it was written by another version of mergebench (cache format {meta.get(FORMAT_FIELD, '1')}, "
                f"this one writes {CACHE_FORMAT})")
    if meta.get(KEY_FIELD) != key_json:
        return f"it was stored under another key ({meta.get(KEY_FIELD)}, not {key_json})"
    return ""


def _write_failure(what: str, path: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return (f"cannot write {what} to {path}: {reason}; free some space or make the folder writable, or point "
            f"MERGEBENCH_CACHE at another folder")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable where the platform allows it (not every file system syncs a folder)."""
    try:
        _fsync(folder)
    except OSError:
        pass
