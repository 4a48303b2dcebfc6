"""The streaming merge engine, and the base classes of every data-free method.

A `TensorMergeMethod` says how to merge one tensor from the base and the experts (`merge_tensor`); a
`TaskVectorMethod` says it from the stacked task vectors (`merge_task_vectors`), which the engine then reads
straight into one buffer. A method that needs a statistic over the whole model gathers it in passes over a
`MergeStream` first (`prepare`), or corrects a few entries once every tensor has been merged (`finish`). The engine
reads one tensor from each model at a time and hands the merged tensor to a sink (a dict for benchmark runs, a
safetensors file for `mergebench merge`).

Memory is bounded by blocks, not tensors: a method that declares itself element-wise (`blockwise = True`; every
method built on `pipeline.TaskVectorPipelineMethod` is) gets large tensors in blocks of at most `block_entries`
entries per model, so the peak is about a block times the number of models whatever the largest tensor. Methods
that need a whole tensor (an SVD, an angle between whole tensors) leave `blockwise` False and get it whole.
The same code runs on a GPU (`device`): blocks are read into (pinned) host buffers, copied to the device and merged
there, with the next block read while the device works (`prefetch`).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from mergebench_core.contract.api import PRETRAINED, MergeOutput, Method, ModelPool, PerTaskModels, RunContext
from mergebench_core.errors import CheckpointError, MergebenchError
from mergebench_core.engine.roles import Fallbacks, MatrixView, Role, declared_roles, model_roles, resolve_roles, role_from_name
from mergebench_core.engine.running_stats import rule_value
from mergebench_core.engine.tensors import (
    StateDictSource,
    SupportsReadInto,
    SupportsReadSlices,
    TensorSource,
    check_compatible,
    check_finite,
    is_mergeable,
    task_vectors,
)

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


def _shares_storage(out: torch.Tensor, *inputs: torch.Tensor) -> bool:
    storage = out.untyped_storage().data_ptr()
    return any(storage == t.untyped_storage().data_ptr() for t in inputs)


def _read_flat(src: TensorSource, key: str, start: int, out: torch.Tensor) -> None:
    """Entries [start, start + out.numel()) of tensor `key` of `src` into `out` (the tensor's dtype)."""
    if isinstance(src, SupportsReadInto):
        src.read_into(key, out, start)
    else:
        out.copy_(src.get(key).reshape(-1)[start:start + out.numel()])


class TensorMergeMethod(Method):
    """A data-free method computed tensor by tensor; runs on pools (`mergebench run`) and files (`merge`)."""

    requires_base: ClassVar[bool] = True
    blockwise: ClassVar[bool] = False
    """True when each output entry depends only on the inputs at the same entry (an element-wise method): large
    tensors then reach `merge_tensor` in flat blocks of at most `MergeStream.block_entries` entries per model, and
    memory stays bounded by a block. False (the default, right for any method) hands every tensor over whole."""

    def __init__(self, params: Any | None = None):
        super().__init__(params)
        self.seed = 0
        self.extras: dict[str, Any] = {}
        self.roles: dict[str, Role] = {}
        """Every tensor's role, set by the engine before `prepare` (see `mergebench_core.engine.roles`)."""
        self.fallbacks = Fallbacks(self.name if hasattr(self, "name") else type(self).__name__)

    def role(self, key: str, shape: tuple[int, ...]) -> Role:
        """The role of tensor `key` (of `shape`): the engine's, else what its name and shape suggest."""
        return self.roles.get(key) or role_from_name(key, tuple(shape))

    def prepare(self, stream: MergeStream) -> None:
        """Gather whole-model statistics in passes over `stream` before merging; most methods need none."""

    def begin_tensor(self, key: str, stream: MergeStream, blocks: Sequence[Block]) -> None:
        """Called before the blocks of each floating-point tensor are merged (a per-tensor statistic over several
        blocks, for instance an exact per-tensor threshold, is gathered here)."""

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        """The merged value of tensor `key` (or of a flat block of it, for a `blockwise` method), given its value in
        the base (None without one) and in each expert. A task-specific method (`info.task_specific`) returns one
        output per expert, stacked. Implement this, or subclass `TaskVectorMethod`."""
        if base is None:
            raise MergebenchError(f"method {self.name!r} works on task vectors and needs a pretrained (base) model")
        return self.merge_task_vectors(key, base, task_vectors(experts, base))

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        """See `TaskVectorMethod`; a plain `TensorMergeMethod` that implements it gets τ computed from the experts."""
        raise NotImplementedError(f"{type(self).__name__} implements neither merge_tensor nor merge_task_vectors")

    @classmethod
    def needs_task_vectors(cls) -> bool:
        return cls.requires_base

    def finish(self) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor]]:
        """Corrections to tensors already merged, once every tensor has been: (key, flat indices, values).

        Indices None replace the whole tensor. A method that can settle a few entries only after seeing the whole
        model yields them here (a task-specific method yields stacked values, one row per expert).
        """
        return iter(())

    def generator(self, key: str) -> torch.Generator:
        """A generator for tensor `key` that depends only on the seed and the key, not on the order of tensors."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))

    def select_experts(self, names: Sequence[str]) -> list[str]:
        """The experts this method merges, by name, out of the pool's (or the files') `names`: all of them unless a
        parameter chooses (SLERP's `models`). Raise `MergebenchError` for a choice that cannot be met."""
        return list(names)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        names = self.select_experts(pool.expert_names)
        base = pool_source(pool, PRETRAINED) if pool.has_pretrained else None
        experts = [pool_source(pool, n) for n in names]
        # the model is loaded first: its modules give every tensor's role (a conv kernel's matrix view, running
        # statistics); "recompute" is settled after the merge (by the runner), so the engine writes the mean
        first = pool.load_model(PRETRAINED if pool.has_pretrained else names[0])
        roles = model_roles(first, declared_roles(pool))
        bn_stats = "base" if ctx.bn_stats == "base" else "mean"
        if not self.info.task_specific:
            merged: dict[str, torch.Tensor] = {}
            merge_sources(self, base, experts, sink=merged, seed=ctx.seed, progress=ctx.track, roles=roles,
                          bn_stats=bn_stats)
            first.load_state_dict(merged)
            return MergeOutput(first, extras=dict(self.extras))
        tasks = [pool.task_of(n) for n in names]
        if len(set(tasks)) != len(tasks):
            raise MergebenchError(f"{self.name} builds one model per task, but experts of pool {pool.name!r} share a "
                                  f"task: {tasks}")
        per_task: list[dict[str, torch.Tensor]] = [{} for _ in names]
        merge_sources(self, base, experts, sink=per_task, seed=ctx.seed, progress=ctx.track, roles=roles,
                      bn_stats=bn_stats)
        models = {}
        for i, (task, tensors) in enumerate(zip(tasks, per_task)):
            model = first if i == 0 else pool.load_model(PRETRAINED if pool.has_pretrained else names[0])
            model.load_state_dict(tensors)
            models[task] = model
        return MergeOutput(PerTaskModels(models), extras=dict(self.extras))


class TaskVectorMethod(TensorMergeMethod):
    """A data-free method written on task vectors τ_t = θ_t − θ_0: implement `merge_task_vectors(key, base, taus)`.

    The engine reads every expert straight into one stacked float32 buffer τ (n_experts, *shape) and subtracts the
    base in place; the method may overwrite τ. A `blockwise` method gets flat blocks instead: base (m,) and τ
    (n_experts, m), through `merge_block`, which also says where the block lies.
    """

    requires_base: ClassVar[bool] = True

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement merge_task_vectors")

    def merge_block(self, block: Block, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        """The merged values of one block of a tensor (the whole tensor, shaped, unless the method is
        `blockwise`); by default `merge_task_vectors` on it."""
        return self.merge_task_vectors(block.key, base, taus)


class MatrixTaskVectorMethod(TaskVectorMethod):
    """A task-vector method that merges the weight of every linear map as a matrix (an SVD, a least-squares problem:
    TSV-M, Iso-C, WUDI) and every 0-D or 1-D tensor (biases, norm scales) as the mean of its task vectors, as their
    reference code does; θ = θ_0 + `scale()` · merged. Such methods need whole tensors, so they are never
    `blockwise`.

    Which tensors are matrices comes from their role (`mergebench_core.engine.roles`): a 2-D tensor is a matrix as stored
    (Linear, Embedding), a convolution kernel (out, in, *k) is merged on its matrix view out × (in · prod(k)) and
    reshaped back. A tensor of two or more dimensions with no usable view (a grouped convolution, a 3-D parameter)
    falls back to the mean with a warning, counted in the result's extras (`fallback_tensors`)."""

    def merge_matrix(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        """The merged update of a weight matrix from its stacked task vectors (T, rows, cols)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement merge_matrix")

    def scale(self) -> float:
        return 1.0

    def matrix_view(self, key: str, shape: tuple[int, ...]) -> MatrixView | None:
        """The view under which tensor `key` is merged as a matrix, or None for the mean (recording a fallback when
        the tensor is more than a vector)."""
        role = self.role(key, shape)
        view = role.view if role.view is not None else (MatrixView("linear") if len(shape) == 2 else None)
        if len(shape) < 2:
            return None  # biases, norms, scalars: the mean is the method's own rule
        if view is None:
            self.fallbacks.add(key, "mean", f"a {len(shape)}-D {role.kind} tensor with no matrix view")
            return None
        if not view.usable:
            self.fallbacks.add(key, "mean", "a grouped convolution, whose kernel is not one matrix",
                               f" (groups={view.groups})")
            return None
        return view

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        shape = tuple(taus.shape[1:])
        view = self.matrix_view(key, shape)
        if view is None:
            merged = taus.mean(0)
        else:
            merged = view.from_matrix(self.merge_matrix(key, view.to_matrix(taus, batch_dims=1)), shape)
        return base.to(torch.float32) + self.scale() * merged


@runtime_checkable
class TensorSourcePool(Protocol):
    """A model pool that can hand out a model's tensors one at a time (file-backed pools), so that a merge never
    builds whole models; other pools are read through `ModelPool.state_dict`."""

    def tensor_source(self, name: str) -> TensorSource: ...


def pool_source(pool: ModelPool, name: str) -> TensorSource:
    """Model `name` of `pool` as a `TensorSource`: lazily when the pool is a `TensorSourcePool`, else its state dict."""
    if isinstance(pool, TensorSourcePool):
        return pool.tensor_source(name)
    return StateDictSource(pool.state_dict(name), f"{pool.name}/{name}")


def file_merge_refusal(method_cls: type[Method]) -> str | None:
    """Why `mergebench merge` cannot run `method_cls` on checkpoint files, or None when it can."""
    if issubclass(method_cls, TensorMergeMethod):
        return None
    info, name = method_cls.info, method_cls.name
    if info.kind == "ensemble":
        return (f"method {name!r} is an output ensemble: it keeps every expert and averages their predictions when "
                f"they are scored, so there is no merged checkpoint to write. Score it with "
                f"`mergebench run --method {name} --modelpool ...`")
    if info.data != "none":
        return (f"method {name!r} needs {info.data} data from a task pool, which checkpoint files do not carry; "
                f"use `mergebench run --method {name} --modelpool ...`")
    if info.kind == "training":
        return (f"method {name!r} trains models rather than merging them; use `mergebench run --method {name} "
                f"--modelpool ...`")
    return (f"method {name!r} works on a whole model pool, not tensor by tensor, so it cannot merge files; use "
            f"`mergebench run --method {name} --modelpool ...`")


_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def checkpoint_task_names(paths: Sequence[str | Path], given: Sequence[str] | None = None) -> list[str]:
    """One name per expert checkpoint for `mergebench merge`: `given` (`--task-names`), or each input's name (a
    file's stem, a folder's name, a Hugging Face cache snapshot's repository name). They name per-task outputs
    (`<task>.safetensors`) and are what `slerp.models` refers to, so they must be distinct file names."""
    if given:
        names = list(given)
        if len(names) != len(paths):
            raise MergebenchError(f"--task-names gives {len(names)} names for {len(paths)} models; give one per model")
    else:
        names = []
        for p in map(Path, paths):
            if p.name.endswith(".index.json") or (p.is_file() and p.parent.name != "" and p.stem == "model"):
                p = p.parent
            if p.parent.name == "snapshots":  # models--org--name/snapshots/<revision>
                p = p.parent.parent
            name = p.name.removesuffix(".safetensors")
            names.append(name.split("--")[-1] if name.startswith("models--") else name)
    for n in names:
        if not _TASK_NAME.fullmatch(n):
            raise MergebenchError(f"task name {n!r} is not a plain file name (letters, digits, . _ + -); "
                                  f"choose names with --task-names")
    if len(set(names)) != len(names):
        raise MergebenchError(f"the models' names are not distinct ({', '.join(names)}); name them with "
                              f"--task-names a,b,...")
    return names


def merge_sources(method: TensorMergeMethod, base: TensorSource | None, experts: Sequence[TensorSource], *,
                  sink: Sink | MutableMapping[str, torch.Tensor] | Sequence[Sink | MutableMapping[str, torch.Tensor]],
                  seed: int = 0, check_values: bool = True, progress: Callable[..., Iterator[Any]] | None = None,
                  device: torch.device | str = "cpu", block_entries: int = DEFAULT_BLOCK_ENTRIES,
                  prefetch: bool | None = None, roles: Mapping[str, Role] | None = None,
                  bn_stats: str = "mean") -> None:
    """Run `method` over the sources, handing each output tensor to `sink` (a `Sink`, or a dict to fill) in the
    base's key order, then the method's corrections (`finish`).

    A task-specific method (`info.task_specific`: one model per expert) writes to a sequence of sinks, one per
    expert in order; its merge returns the stacked outputs (n_experts, *shape), and integer buffers go to each.
    `device`, `block_entries` and `prefetch` are the `MergeStream`'s.

    `roles` (from the model: `roles.roles_of`) give each tensor's role; keys they do not name get the role their name
    and shape suggest (checkpoint files). Running statistics never reach the method: they are set by `bn_stats`,
    "base" (the pretrained model's) or "mean" (the experts' average; counters are the base's), and tensors the
    method could not treat as their role asks are counted in `method.extras["fallback_tensors"]`.
    """
    per_task = method.info.task_specific
    if not experts:
        raise MergebenchError("nothing to merge: no expert models were given")
    if per_task:
        if isinstance(sink, (Sink, MutableMapping)) or len(sink) != len(experts):
            raise MergebenchError(f"method {method.name!r} builds one model per expert: give one sink per expert")
        sink_list = list(sink)
    else:
        if not isinstance(sink, (Sink, MutableMapping)):
            raise MergebenchError(f"method {method.name!r} builds one model: give one sink")
        sink_list = [sink]
    if method.requires_base and base is None:
        raise MergebenchError(f"method {method.name!r} needs a pretrained (base) model")
    sources = ([base] if base is not None else []) + list(experts)
    keys = check_compatible(sources)
    ref = sources[0]
    shapes = {k: tuple(ref.shape(k)) for k in keys}
    dtypes = {k: ref.dtype(k) for k in keys}
    sinks = [s if isinstance(s, Sink) else DictSink(s, shapes, dtypes) for s in sink_list]
    method.roles = resolve_roles(keys, shapes, dtypes, roles)
    running = {k for k in keys if method.roles[k].is_running_stat}
    if running and bn_stats not in ("base", "mean"):
        raise MergebenchError(f"bn_stats {bn_stats!r}: a merge sets running statistics by 'base' or 'mean' "
                              f"('recompute' needs data, after the merge)")
    float_keys = [k for k in keys if is_mergeable(ref.dtype(k)) and k not in running]
    method.seed = seed
    method.extras = {}
    method.fallbacks = Fallbacks(method.name)
    stream = MergeStream(float_keys, base, experts, check_values=check_values, device=device,
                         block_entries=block_entries, prefetch=prefetch)
    on_task_vectors = isinstance(method, TaskVectorMethod)
    if on_task_vectors and base is None:
        raise MergebenchError(f"method {method.name!r} works on task vectors and needs a pretrained (base) model")
    try:
        method.prepare(stream)
        float_set = set(float_keys)
        iterator = progress(keys, desc=f"merging ({method.name})", total=len(keys)) if progress else keys
        for key in iterator:
            if key in running:  # the rule, never the method (and the same value in every per-task model)
                value = rule_value(key, bn_stats, base.get(key) if base is not None else None,
                                   [e.get(key) for e in experts])
                for s in sinks:
                    s.write(key, value)
                continue
            if key not in float_set:  # integer buffers are copied, after checking the experts agree
                value = ref.get(key)
                for src in sources[1:]:
                    if not torch.equal(src.get(key), value):
                        raise CheckpointError(f"non-floating tensor {key!r} differs between {ref.name} and "
                                              f"{src.name}; it cannot be merged")
                for s in sinks:
                    s.write(key, value)
                continue
            _merge_key(method, stream, key, sinks, per_task, on_task_vectors, len(experts), dtypes[key])
        for key, index, values in method.finish():
            if per_task:
                for s, v in zip(sinks, values):
                    s.patch(key, index, v.to(dtypes[key]))
            else:
                sinks[0].patch(key, index, values.to(dtypes[key]))
        if method.fallbacks:
            method.extras["fallback_tensors"] = dict(method.fallbacks.counts)
    finally:
        stream.close()


def _merge_key(method: TensorMergeMethod, stream: MergeStream, key: str, sinks: list[Sink], per_task: bool,
               on_task_vectors: bool, n_experts: int, dtype: torch.dtype) -> None:
    """Merge one floating-point tensor, block by block when the method allows it, into the sinks."""
    blocks = stream.blocks(key, split=method.blockwise)
    method.begin_tensor(key, stream, blocks)
    shape = stream.shape(key)
    whole = len(blocks) == 1
    shaped = whole and not method.blockwise

    def merged() -> Iterator[tuple[Block, torch.Tensor]]:
        # explicit loops that drop each block's inputs before the next is read: one block alive at a time
        if on_task_vectors:
            assert isinstance(method, TaskVectorMethod)
            for block, b, taus in stream.task_vector_blocks(key, blocks, reuse=not shaped):
                out = method.merge_block(block, b.view(shape) if shaped else b,
                                         taus.view(n_experts, *shape) if shaped else taus)
                if not shaped and _shares_storage(out, taus, b):  # the stream reuses its buffers
                    out = out.clone()
                del b, taus
                yield block, out
        else:
            for block in blocks:
                b, ex = stream.read(key, None if shaped else block)
                out = method.merge_tensor(key, b, ex)
                del b, ex
                yield block, out

    pieces = merged()
    assembled: dict[int, torch.Tensor] = {}
    for block, out in pieces:
        rows = (n_experts,) if per_task else ()
        if tuple(out.shape) not in ((*rows, *shape), (*rows, block.numel)) or \
                (not block.whole and tuple(out.shape) != (*rows, block.numel)):
            raise MergebenchError(f"method {method.name!r} returned shape {list(out.shape)} for {key!r}, "
                                  f"expected {[*rows, *shape] if block.whole else [*rows, block.numel]}")
        out = out.to(dtype)
        outs = list(out) if per_task else [out]
        for i, (s, o) in enumerate(zip(sinks, outs)):
            if block.whole:
                s.write(key, o.reshape(shape).cpu())
            elif isinstance(s, BlockSink):
                s.write_block(key, block.start, o.cpu())
            else:  # a sink that takes whole tensors only: assemble this one
                if block.start == 0:
                    assembled[i] = torch.empty(shape, dtype=dtype)
                assembled[i].view(-1)[block.start:block.stop] = o.cpu()
                if block.stop == torch.Size(shape).numel():
                    s.write(key, assembled.pop(i))
        del out, outs, o
