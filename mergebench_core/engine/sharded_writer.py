"""Writing a merged model as shards of safetensors with an index, the layout `transformers` and MergeKit write.

Tensors go to shards in order, a new shard starting when the next tensor would take the current one past the limit
(a tensor larger than the limit gets a shard of its own): MergeKit's rule, so the same config and limit give the
same files. One shard is `model.safetensors` without an index; several are `model-00001-of-0000N.safetensors` with
`model.safetensors.index.json`. Each shard is a `StreamingSafetensorsWriter`: nothing is in place before `commit`,
which also removes the weight files of an earlier merge into the same folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mergebench_core.engine.safetensors_writer import StreamingSafetensorsWriter
from mergebench_core.errors import MergebenchError

DEFAULT_SHARD_SIZE = "5B"
"""MergeKit's default `--out-shard-size`."""

_SIZE = re.compile(r"\s*(\d+)\s*([kKmMbB]?)\s*")
_FACTOR = {"": 1, "k": 1000, "m": 1000**2, "b": 1000**3}


def parse_shard_size(text: str | int) -> int:
    """Bytes per shard from MergeKit's size syntax: a whole number with an optional K, M or B (thousand, million,
    billion; any case). MergeKit counts a shard's size in bytes of tensor data, and so does this; 0 means one
    file whatever the size."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    m = _SIZE.fullmatch(str(text))
    if m is None:
        raise MergebenchError(f"--out-shard-size {text!r}: give a number of bytes, optionally with K, M or B "
                              f"(thousand, million, billion), as MergeKit does: 5B (the default), 500M, 0 for one "
                              f"file")
    return int(m.group(1)) * _FACTOR[m.group(2).lower()]


def shard_plan(layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[int]]:
    """The layout's entries (by position) in each shard."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(layout):
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        if shards[-1] and max_bytes > 0 and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


class ShardedSafetensorsWriter:
    """A `Sink` that writes the layout's tensors into shards under `folder` (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 max_bytes: int, metadata: Mapping[str, str] | None = None, prefix: str = "model"):
        self.folder, self.prefix = Path(folder), prefix
        plan = shard_plan(layout, max_bytes)
        n = len(plan)
        self.names = [f"{prefix}.safetensors"] if n == 1 else \
            [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.index_name = f"{prefix}.safetensors.index.json"
        self.total_size = sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for _, s, d in layout)
        self._shard: dict[str, int] = {}
        self.writers: list[StreamingSafetensorsWriter] = []
        try:
            for i, entries in enumerate(plan):
                for e in entries:
                    self._shard[layout[e][0]] = i
                self.writers.append(StreamingSafetensorsWriter(self.folder / self.names[i],
                                                               [layout[e] for e in entries], metadata))
        except BaseException:
            self.abort()
            raise

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.writers[self._shard[key]].write(key, tensor)

    def write_block(self, key: str, start: int, values: torch.Tensor) -> None:
        self.writers[self._shard[key]].write_block(key, start, values)

    def patch(self, key: str, index: torch.Tensor | None, values: torch.Tensor) -> None:
        self.writers[self._shard[key]].patch(key, index, values)

    def commit(self) -> list[Path]:
        """Put every shard (and the index) in place; returns the files written."""
        try:
            files = [w.commit() for w in self.writers]
        except BaseException:
            self.abort()
            raise
        self._remove_stale(set(self.names) | ({self.index_name} if len(files) > 1 else set()))
        if len(files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {k: self.names[i] for k, i in self._shard.items()}}
            tmp = self.folder / f".{self.index_name}.{os.getpid()}.partial"
            tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, self.folder / self.index_name)
            files.append(self.folder / self.index_name)
        return files

    def _remove_stale(self, ours: set[str]) -> None:
        """Remove the weights of an earlier merge into the same folder: a `model.safetensors` left beside new shards
        is what `from_pretrained` would load, and old shards beside a new index would be read by nothing but still
        look like part of the model."""
        stale = re.compile(rf"{re.escape(self.prefix)}(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?")
        for f in self.folder.iterdir():
            if stale.fullmatch(f.name) and f.name not in ours and (f.is_file() or f.is_symlink()):
                f.unlink()

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
