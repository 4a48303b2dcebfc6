"""Reading safetensors checkpoints lazily: headers checked up front, each tensor read only when asked for, into
memory the caller owns."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from mergebench_core.engine.checkpoint_files import resolve_checkpoint_files
from mergebench_core.engine.safetensors_format import DTYPES, clipped_repr, parse_header, pread_exact
from mergebench_core.errors import CheckpointError


class SafetensorsSource:
    """One or more safetensors files (a sharded checkpoint, or a Hugging Face model folder), read lazily.

    The header of each file is parsed and checked up front (so a truncated or corrupt file is reported by name
    before any work starts); tensor data is read only when asked for, one tensor at a time.

    At most `max_open_files` of its files are open at once (the least recently read is closed first): a checkpoint
    split into thousands of shards, times the models of a merge, would otherwise exhaust the process's descriptors.
    """

    max_open_files: int = 16
    """Files kept open per source; a merge reads a shard's tensors one after another, so a few suffice."""

    def __init__(self, path: str | os.PathLike[str], name: str | None = None):
        self.path = Path(path)
        self.name = name or str(self.path)
        self.files = resolve_checkpoint_files(self.path)
        self._where: dict[str, Path] = {}
        self._meta: dict[str, dict] = {}
        self._data_start: dict[Path, int] = {}
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.RLock()  # a prefetch thread may read while another closes a file to open the next
        for f in self.files:
            header, self._data_start[f] = parse_header(f)
            for key, meta in header.items():
                if key in self._where:
                    raise CheckpointError(f"tensor {clipped_repr(key)} appears in both {self._where[key]} and {f}")
                self._where[key], self._meta[key] = f, meta

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._meta[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._meta[key]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        """A fresh tensor read with one positioned read (pread) into memory the caller owns.

        Reading into an anonymous buffer, not a memory map of the file, keeps the process's resident memory at the
        tensors actually alive: pages of a mapped file stay resident (and counted) for as long as the file is open,
        so a merge of nine 350 MB checkpoints would otherwise hold all 3 GB of them.
        """
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        self.read_into(key, out)
        return out

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        """Read `out.numel()` entries of tensor `key`, from flat index `start` on, into `out` (contiguous, same dtype).

        With the default `start` and an `out` of the tensor's size this reads the whole tensor without allocating;
        a smaller `out` reads a slice (the sample of `threshold_search` reads a few of them).
        """
        f = self._where[key]
        numel = torch.Size(self.shape(key)).numel()
        if out.dtype != self.dtype(key) or not out.is_contiguous() or start < 0 or start + out.numel() > numel:
            raise ValueError(f"read_into({key!r}) needs a contiguous {self.dtype(key)} tensor of at most "
                             f"{numel - start} entries, got {out.dtype} {list(out.shape)} from index {start}")
        if out.numel() == 0:
            return
        offset = self._data_start[f] + self._meta[key]["data_offsets"][0] + start * out.element_size()
        try:
            with self._lock:
                pread_exact(self._fd(f), memoryview(out.view(-1).view(torch.uint8).numpy()), offset)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {key!r} from {f}: {exc}") from exc

    def _fd(self, f: Path) -> int:
        """The file's descriptor, opened on first use and kept until `close` or until `max_open_files` others have
        been read since. Call with the lock held, and read before releasing it: the descriptor may be closed then."""
        fd = self._fds.get(f)
        if fd is not None:
            self._fds.move_to_end(f)
            return fd
        while len(self._fds) >= max(1, self.max_open_files):
            os.close(self._fds.popitem(last=False)[1])
        fd = self._fds[f] = os.open(f, os.O_RDONLY)
        return fd

    def read_slices(self, key: str, starts: Sequence[int], out: torch.Tensor) -> None:
        """Read `out.shape[1]` entries of tensor `key` from each flat index in `starts` into the rows of `out`.

        One positioned read per slice and no other per-slice work: the sample of `threshold_search` reads thousands
        of small slices.
        """
        if len(starts) == 0:
            return
        length = out.shape[1]
        numel = torch.Size(self.shape(key)).numel()
        if out.dtype != self.dtype(key) or not out.is_contiguous() or out.shape[0] != len(starts) \
                or min(starts) < 0 or max(starts) + length > numel:
            raise ValueError(f"read_slices({key!r}) needs a contiguous {self.dtype(key)} tensor of "
                             f"{len(starts)} rows and slices inside the tensor's {numel} entries")
        f = self._where[key]
        size = out.element_size()
        nbytes = length * size
        begin = self._data_start[f] + self._meta[key]["data_offsets"][0]
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        try:
            with self._lock:
                fd = self._fd(f)
                for i, start in enumerate(starts):
                    if os.preadv(fd, [buf[i * nbytes:(i + 1) * nbytes]], begin + start * size) != nbytes:
                        self.read_into(key, out[i], start)  # a short read: the careful path retries or says why
        except OSError as exc:
            raise CheckpointError(f"cannot read tensor {key!r} from {f}: {exc}") from exc

    def close(self) -> None:
        """Close the open files; a later read opens them again."""
        with self._lock:
            fds, self._fds = self._fds, OrderedDict()
        for fd in fds.values():
            os.close(fd)

    def __getstate__(self) -> dict:
        """Descriptors and the lock belong to this process; a copy (another worker) opens its own files."""
        state = dict(self.__dict__)
        state["_fds"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    src = SafetensorsSource(path)
    return {k: src.get(k) for k in src.keys()}

