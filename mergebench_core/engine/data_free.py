"""Data-free methods: their base classes, and the loop that runs one over tensor sources (`merge_sources`).

A `TensorMergeMethod` says how to merge one tensor from the base and the experts (`merge_tensor`); a
`TaskVectorMethod` says it from the stacked task vectors (`merge_task_vectors`), which the engine then reads
straight into one buffer. A method that needs a statistic over the whole model gathers it in passes over a
`MergeStream` first (`prepare`), or corrects a few entries once every tensor has been merged (`finish`). The engine
reads one tensor from each model at a time and hands the merged tensor to a sink (a dict for benchmark runs, a
safetensors file for `mergebench merge`). The classes and the loop live together because each needs the other: a
method's `run` is the loop over its pool, and the loop dispatches on which base a method extends.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, ClassVar

import torch

from mergebench_core.contract.api import PRETRAINED, MergeOutput, Method, ModelPool, PerTaskModels, RunContext
from mergebench_core.engine.pool_sources import pool_source
from mergebench_core.engine.roles import (
    Fallbacks,
    MatrixView,
    Role,
    declared_roles,
    model_roles,
    resolve_roles,
    role_from_name,
)
from mergebench_core.engine.running_stats import rule_value
from mergebench_core.engine.sources import TensorSource, check_compatible
from mergebench_core.engine.stream import DEFAULT_BLOCK_ENTRIES, Block, BlockSink, DictSink, MergeStream, Sink
from mergebench_core.engine.tensor_math import is_mergeable, task_vectors
from mergebench_core.errors import CheckpointError, MergebenchError


class TensorMergeMethod(Method):
    """A data-free method computed tensor by tensor; runs on pools (`mergebench run`) and files (`merge`)."""

    requires_base: ClassVar[bool] = True
    merges_files: ClassVar[bool] = True
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

    Which tensors are matrices comes from their role (`mergebench_core.engine.roles`): a 2-D tensor is a matrix as
    stored (Linear, Embedding), a convolution kernel (out, in, *k) is merged on its matrix view out × (in · prod(k))
    and reshaped back. A tensor of two or more dimensions with no usable view (a grouped convolution, a 3-D parameter)
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


def _shares_storage(out: torch.Tensor, *inputs: torch.Tensor) -> bool:
    storage = out.untyped_storage().data_ptr()
    return any(storage == t.untyped_storage().data_ptr() for t in inputs)
