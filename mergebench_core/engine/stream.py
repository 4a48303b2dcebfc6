"""The merge stream: the floating-point tensors of a base and its experts, read one tensor (or one block) at a time,
and the sinks that merged tensors go to.

Memory is bounded by blocks, not tensors: a method that declares itself element-wise (`blockwise = True`; every
method built on `pipeline.TaskVectorPipelineMethod` is) gets large tensors in blocks of at most `block_entries`
entries per model, so the peak is about a block times the number of models whatever the largest tensor. Methods
that need a whole tensor (an SVD, an angle between whole tensors) leave `blockwise` False and get it whole.
The same code runs on a GPU (`device`): blocks are read into (pinned) host buffers, copied to the device and merged
there, with the next block read while the device works (`prefetch`).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from mergebench_core.engine.sources import SupportsReadInto, SupportsReadSlices, TensorSource
from mergebench_core.engine.tensor_math import check_finite
from mergebench_core.errors import MergebenchError

DEFAULT_BLOCK_ENTRIES = 1 << 22
"""Entries per model in one block (16 MiB of float32): 8 experts' task vectors then take 128 MiB at most."""


@runtime_checkable
class Sink(Protocol):
    """Where merged tensors go: `write` each once, in key order; `patch` corrects entries of one already written."""

    def write(self, key: str, tensor: torch.Tensor) -> None: ...

    def patch(self, key: str, index: torch.Tensor | None, values: torch.Tensor) -> None: ...


@runtime_checkable
class BlockSink(Protocol):
    """A sink that takes a tensor in blocks of flat entries, in order (so no tensor need exist whole)."""

    def write_block(self, key: str, start: int, values: torch.Tensor) -> None: ...


class DictSink:
    """A sink that keeps the merged tensors in a dict (benchmark runs, tests)."""

    def __init__(self, tensors: MutableMapping[str, torch.Tensor], shapes: dict[str, tuple[int, ...]] | None = None,
                 dtypes: dict[str, torch.dtype] | None = None):
        self.tensors = tensors
        self.shapes, self.dtypes = shapes or {}, dtypes or {}

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.tensors[key] = tensor

    def write_block(self, key: str, start: int, values: torch.Tensor) -> None:
        if start == 0:
            self.tensors[key] = torch.empty(self.shapes[key], dtype=self.dtypes[key])
        self.tensors[key].view(-1)[start:start + values.numel()] = values.reshape(-1)

    def patch(self, key: str, index: torch.Tensor | None, values: torch.Tensor) -> None:
        if index is None:
            self.tensors[key] = values.reshape(self.tensors[key].shape)
        else:  # merge_tensor results are fresh tensors, so writing into them touches no input
            self.tensors[key].view(-1)[index] = values


@dataclass(frozen=True)
class Block:
    """Flat entries [start, stop) of tensor `key` (of `shape`); `whole` when that is the entire tensor."""

    key: str
    start: int
    stop: int
    shape: tuple[int, ...]

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == torch.Size(self.shape).numel()

    @property
    def numel(self) -> int:
        return self.stop - self.start


class MergeStream:
    """Re-iterable view of the floating-point tensors of a base and its experts, one key (or block) at a time.

    Reads go straight into buffers the stream owns (`SupportsReadInto` sources), are checked for NaN and inf the
    first time each block is seen, and land on `device`. With `prefetch`, the next block of a tensor is read in a
    background thread while the current one is merged (worth it when a GPU does the merging; on a CPU the two
    compete for the same cores).
    """

    def __init__(self, keys: Sequence[str], base: TensorSource | None, experts: Sequence[TensorSource],
                 check_values: bool = True, *, device: torch.device | str = "cpu",
                 block_entries: int = DEFAULT_BLOCK_ENTRIES, prefetch: bool | None = None):
        self.keys = list(keys)
        self.base, self.experts = base, list(experts)
        self.device = torch.device(device)
        self.block_entries = max(1, int(block_entries))
        self.prefetch = self.device.type != "cpu" if prefetch is None else prefetch
        self._checked: set[tuple[str, int, int]] | None = set() if check_values else None
        self._pool: ThreadPoolExecutor | None = None
        self._buffers: dict[tuple[str, int, torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple((self.base or self.experts[0]).shape(key))

    def numel(self) -> int:
        return sum(torch.Size(self.shape(k)).numel() for k in self.keys)

    def blocks(self, key: str, split: bool = True) -> list[Block]:
        """The blocks a tensor is read in: one when it fits `block_entries` (or `split` is False), else runs of
        `block_entries` flat entries."""
        shape = self.shape(key)
        n = torch.Size(shape).numel()
        if not split or n <= self.block_entries:
            return [Block(key, 0, n, shape)]
        return [Block(key, a, min(n, a + self.block_entries), shape) for a in range(0, n, self.block_entries)]

    # -- reading -----------------------------------------------------------------------------------------------

    def _sources(self) -> list[TensorSource]:
        return ([self.base] if self.base is not None else []) + self.experts

    def _buffer(self, name: str, slot: int, dtype: torch.dtype, numel: int, device: torch.device,
                pin: bool = False) -> torch.Tensor:
        """A flat buffer of at least `numel` entries kept by the stream for reuse (slot 0 or 1: the block being
        merged and, with prefetch, the one being read). Reusing them keeps the process's memory flat: allocating
        and freeing blocks of a hundred MB each fragments the heap, and the peak then grows with the run."""
        tag = (name, slot, dtype, device)
        buf = self._buffers.get(tag)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(tag, None)
            buf = self._buffers[tag] = torch.empty(numel, dtype=dtype, device=device, pin_memory=pin)
        return buf[:numel]

    def _read_raw(self, block: Block, sources: Sequence[TensorSource],
                  slot: int | None = None) -> torch.Tensor | list[torch.Tensor]:
        """The block of each source, on the host: one (S, m) tensor when they share a dtype (in a reused buffer
        when `slot` is given), else a list."""
        key, m = block.key, block.numel
        dtypes = {src.dtype(key) for src in sources}
        pin = self.device.type == "cuda"
        if len(dtypes) == 1:
            dtype, shape = dtypes.pop(), (len(sources), m)
            out = torch.empty(shape, dtype=dtype, pin_memory=pin) if slot is None else \
                self._buffer("raw", slot, dtype, len(sources) * m, torch.device("cpu"), pin).view(shape)
            for i, src in enumerate(sources):
                _read_flat(src, key, block.start, out[i])
            rows: torch.Tensor | list[torch.Tensor] = out
        else:
            rows = []
            for src in sources:
                buf = torch.empty(m, dtype=src.dtype(key), pin_memory=pin)
                _read_flat(src, key, block.start, buf)
                rows.append(buf)
        if self._checked is not None and (key, block.start, block.stop) not in self._checked:
            for src, row in zip(sources, rows):
                check_finite(row, key, src.name)
            self._checked.add((key, block.start, block.stop))
        return rows

    def _prefetched(self, blocks: Sequence[Block], sources: Sequence[TensorSource],
                    reuse: bool = False) -> Iterator[tuple[Block, Any, int | None]]:
        """(block, its raw rows, buffer slot) in order; with `prefetch`, block i + 1 is read while block i is
        worked on (into the other slot)."""
        if not self.prefetch or len(blocks) < 2:
            for block in blocks:
                yield block, self._read_raw(block, sources, 0 if reuse else None), 0 if reuse else None
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mergebench-read")
        ahead: Future = self._pool.submit(self._read_raw, blocks[0], sources, 0 if reuse else None)
        for i, block in enumerate(blocks):
            raw = ahead.result()
            if i + 1 < len(blocks):
                ahead = self._pool.submit(self._read_raw, blocks[i + 1], sources, (i + 1) % 2 if reuse else None)
            yield block, raw, i % 2 if reuse else None
            del raw

    def _to_device(self, raw: torch.Tensor | list[torch.Tensor], dtype: torch.dtype,
                   slot: int | None = None) -> torch.Tensor:
        """The raw rows as one (S, m) tensor of `dtype` on the device (in a reused buffer when `slot` is given)."""
        shape = (len(raw), raw[0].numel())
        if isinstance(raw, torch.Tensor) and raw.dtype == dtype and raw.device == self.device:
            return raw
        out = torch.empty(shape, dtype=dtype, device=self.device) if slot is None else \
            self._buffer("rows", slot, dtype, shape[0] * shape[1], self.device).view(shape)
        if isinstance(raw, list):
            for i, row in enumerate(raw):
                out[i].copy_(row, non_blocking=True)
        else:
            out.copy_(raw, non_blocking=True)
        return out

    def read(self, key: str, block: Block | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(base, experts) of a key, each in its own dtype; a block gives flat (m,) tensors, else whole tensors."""
        if block is None:
            base = self.base.get(key) if self.base is not None else None
            experts = [e.get(key) for e in self.experts]
            if self._checked is not None:
                whole = (key, 0, torch.Size(self.shape(key)).numel())
                if whole not in self._checked:
                    if base is not None:
                        check_finite(base, key, self.base.name)  # type: ignore[union-attr]
                    for src, t in zip(self.experts, experts):
                        check_finite(t, key, src.name)
                    self._checked.add(whole)
            return base, experts
        raw = self._read_raw(block, self._sources())
        rows = [r.to(self.device, non_blocking=True) for r in raw]  # fresh: merge_tensor may keep them
        return (rows[0] if self.base is not None else None), list(rows[1 if self.base is not None else 0:])

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | None, list[torch.Tensor]]]:
        for key in self.keys:
            base, experts = self.read(key)
            yield key, base, experts

    def task_vectors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, stacked τ of shape (n_experts, *shape)) for every key, whole; needs a base."""
        for key in self.keys:
            yield key, self.read_task_vectors(key, dtype=dtype)[1]

    def task_vector_blocks(self, key: str, blocks: Sequence[Block] | None = None, dtype: torch.dtype = torch.float32,
                           reuse: bool = False) -> Iterator[tuple[Block, torch.Tensor, torch.Tensor]]:
        """(block, base (m,), τ (n_experts, m)) for each block of `key`, in order, on the stream's device.

        With `reuse`, every block lands in buffers the stream reuses, so a block's tensors are valid only until
        the next block is read (the engine's own passes); without it, each block is freshly allocated.
        """
        if self.base is None:
            raise MergebenchError("task vectors need a pretrained model, and this pool has none")
        for block, raw, slot in self._prefetched(blocks if blocks is not None else self.blocks(key), self._sources(),
                                                 reuse):
            rows = self._to_device(raw, dtype, slot)
            del raw
            taus = rows[1:]
            taus -= rows[0]
            yield block, rows[0], taus
            del rows, taus  # before the next block is read: one block alive at a time

    def read_task_vectors(self, key: str, block: Block | None = None,
                          dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, stacked τ (n_experts, *shape)) of one key, or of one block of it ((m,) and (n_experts, m)).

        Experts are read straight into the rows of one buffer and the base is subtracted in place, so a key costs
        one allocation of the stacked size instead of one per expert plus the stacked copy.
        """
        whole = block is None
        block = block or self.blocks(key, split=False)[0]
        _, base, taus = next(self.task_vector_blocks(key, [block], dtype))
        if whole:
            shape = self.shape(key)
            return base.view(shape), taus.view(len(taus), *shape)
        return base, taus

    def task_vector_slices(self, key: str, starts: Sequence[int], length: int) -> torch.Tensor:
        """τ (float32) at `length` consecutive flat entries from each of `starts`, shape (n_experts, len(starts),
        length), on the host. Reads only those entries from sources that can read slices; others are read whole."""
        if self.base is None:
            raise MergebenchError("task vectors need a pretrained model, and this pool has none")
        sources = self._sources()
        out = torch.empty((len(sources), len(starts), length), dtype=torch.float32)
        for i, src in enumerate(sources):
            if isinstance(src, SupportsReadSlices):
                buf = out[i] if src.dtype(key) == torch.float32 else \
                    torch.empty((len(starts), length), dtype=src.dtype(key))
                src.read_slices(key, starts, buf)
                if buf is not out[i]:
                    out[i].copy_(buf)
            else:
                flat = src.get(key).reshape(-1)
                index = (torch.as_tensor(list(starts)).view(-1, 1) + torch.arange(length)).view(-1)
                out[i] = flat[index].view(len(starts), length).to(torch.float32)
        return out[1:] - out[0]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _read_flat(src: TensorSource, key: str, start: int, out: torch.Tensor) -> None:
    """Entries [start, start + out.numel()) of tensor `key` of `src` into `out` (the tensor's dtype)."""
    if isinstance(src, SupportsReadInto):
        src.read_into(key, out, start)
    else:
        out.copy_(src.get(key).reshape(-1)[start:start + out.numel()])
