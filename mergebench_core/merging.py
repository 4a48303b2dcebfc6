"""The streaming merge engine, and the base class of every data-free method.

A `TensorMergeMethod` says how to merge one tensor from the base and the experts (`merge_tensor`, or
`merge_task_vectors` from stacked task vectors) and, if it needs a statistic over the whole model, how to gather it
in passes over a `MergeStream` first (`prepare`), or which entries to correct once every tensor has been merged
(`finish`, as TIES's one-pass global threshold does). The engine reads one tensor from each model at a time, merges
it and hands it to a sink (a dict for benchmark runs, a safetensors file for `mergebench merge`) that can also patch
what it was given, so memory grows with the largest tensor times the number of models, not with model size.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from .api import PRETRAINED, MergeOutput, Method, ModelPool, RunContext
from .errors import CheckpointError, MergebenchError
from .tensors import TensorSource, check_compatible, check_finite, is_mergeable, task_vectors


@runtime_checkable
class Sink(Protocol):
    """Where merged tensors go: `write` each once, in key order; `patch` corrects entries of one already written."""

    def write(self, key: str, tensor: torch.Tensor) -> None: ...

    def patch(self, key: str, index: torch.Tensor | None, values: torch.Tensor) -> None: ...


class DictSink:
    """A sink that keeps the merged tensors in a dict (benchmark runs, tests)."""

    def __init__(self, tensors: MutableMapping[str, torch.Tensor]):
        self.tensors = tensors

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.tensors[key] = tensor

    def patch(self, key: str, index: torch.Tensor | None, values: torch.Tensor) -> None:
        if index is None:
            self.tensors[key] = values.reshape(self.tensors[key].shape)
        else:  # merge_tensor results are fresh tensors, so writing into them touches no input
            self.tensors[key].view(-1)[index] = values


class MergeStream:
    """Re-iterable view of the floating-point tensors of a base and its experts, one key at a time."""

    def __init__(self, keys: Sequence[str], base: TensorSource | None, experts: Sequence[TensorSource],
                 check_values: bool = True):
        self.keys = list(keys)
        self.base, self.experts = base, list(experts)
        self._checked: set[str] = set() if check_values else set(self.keys)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple((self.base or self.experts[0]).shape(key))

    def numel(self) -> int:
        return sum(torch.Size(self.shape(k)).numel() for k in self.keys)

    def read(self, key: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        base = self.base.get(key) if self.base is not None else None
        experts = [e.get(key) for e in self.experts]
        if key not in self._checked:
            if base is not None:
                check_finite(base, key, self.base.name)  # type: ignore[union-attr]
            for src, t in zip(self.experts, experts):
                check_finite(t, key, src.name)
            self._checked.add(key)
        return base, experts

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | None, list[torch.Tensor]]]:
        for key in self.keys:
            base, experts = self.read(key)
            yield key, base, experts

    def task_vectors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, stacked τ of shape (n_experts, *shape)) for every key; needs a base."""
        for key in self.keys:
            yield key, self.read_task_vectors(key, dtype)[1]

    def read_task_vectors(self, key: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, stacked τ of shape (n_experts, *shape)) of one key, checked like `read`.

        Experts are read straight into the rows of the result and the base is subtracted in place, so each key costs
        one allocation of the stacked size instead of one per expert plus the stacked copy.
        """
        if self.base is None:
            raise MergebenchError("task vectors need a pretrained model, and this pool has none")
        base = self.base.get(key)
        out = torch.empty((len(self.experts), *base.shape), dtype=dtype)
        check = key not in self._checked
        if check:
            check_finite(base, key, self.base.name)
        for i, src in enumerate(self.experts):
            read_into = getattr(src, "read_into", None)
            if read_into is not None and src.dtype(key) == dtype:
                read_into(key, out[i])
                if check:
                    check_finite(out[i], key, src.name)
            else:
                value = src.get(key)
                if check:
                    check_finite(value, key, src.name)
                out[i].copy_(value)
        self._checked.add(key)
        out -= base if base.dtype == dtype else base.to(dtype)
        return base, out

    def task_vector_slices(self, key: str, starts: Sequence[int], length: int) -> torch.Tensor:
        """τ at `length` consecutive flat entries from each of `starts`, shape (n_experts, len(starts), length).

        Reads only those entries from sources that can read slices (safetensors); others are read whole.
        """
        if self.base is None:
            raise MergebenchError("task vectors need a pretrained model, and this pool has none")
        sources = [self.base, *self.experts]
        out = torch.empty((len(sources), len(starts), length), dtype=torch.float32)
        for i, src in enumerate(sources):
            read_slices = getattr(src, "read_slices", None)
            if read_slices is not None and src.dtype(key) == torch.float32:
                read_slices(key, starts, out[i])
            else:
                flat = src.get(key).reshape(-1)
                index = (torch.as_tensor(list(starts)).view(-1, 1) + torch.arange(length)).view(-1)
                out[i] = flat[index].view(len(starts), length).to(torch.float32)
        return out[1:] - out[0]


class TensorMergeMethod(Method):
    """A data-free method computed tensor by tensor; runs on pools (`mergebench run`) and files (`merge`)."""

    requires_base: ClassVar[bool] = True

    def __init__(self, params: Any | None = None):
        super().__init__(params)
        self.seed = 0
        self.extras: dict[str, Any] = {}

    def prepare(self, stream: MergeStream) -> None:
        """Gather whole-model statistics in passes over `stream` before merging; most methods need none."""

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        """The merged value of tensor `key`, given its value in the base (None without one) and in each expert.

        Implement this, or `merge_task_vectors` for a method written on task vectors.
        """
        if base is None:
            raise MergebenchError(f"method {self.name!r} works on task vectors and needs a pretrained (base) model")
        return self.merge_task_vectors(key, base, task_vectors(experts, base))

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        """The merged value of tensor `key` from the base and the stacked task vectors τ (n_experts, *shape), which
        the method may overwrite. The engine then reads every expert straight into τ, sparing a copy per tensor."""
        raise NotImplementedError(f"{type(self).__name__} implements neither merge_tensor nor merge_task_vectors")

    @classmethod
    def needs_task_vectors(cls) -> bool:
        return cls.requires_base

    @classmethod
    def _works_on_task_vectors(cls) -> bool:
        return cls.merge_tensor is TensorMergeMethod.merge_tensor and \
            cls.merge_task_vectors is not TensorMergeMethod.merge_task_vectors

    def finish(self) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor]]:
        """Corrections to tensors already merged, once every tensor has been: (key, flat indices, values).

        Indices None replace the whole tensor. Methods that settle a few entries only after seeing the whole model
        (TIES's one-pass global top-k) yield them here, which spares them a pass over the inputs beforehand.
        """
        return iter(())

    def generator(self, key: str) -> torch.Generator:
        """A generator for tensor `key` that depends only on the seed and the key, not on the order of tensors."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        tensor_source = getattr(pool, "tensor_source", None)

        def source(name: str) -> TensorSource:
            if tensor_source is not None:
                return tensor_source(name)
            from .tensors import StateDictSource
            return StateDictSource(pool.state_dict(name), f"{pool.name}/{name}")

        base = source(PRETRAINED) if pool.has_pretrained else None
        experts = [source(n) for n in pool.expert_names]
        merged: dict[str, torch.Tensor] = {}
        merge_sources(self, base, experts, sink=merged, seed=ctx.seed, progress=ctx.track)
        model = pool.load_model(PRETRAINED if pool.has_pretrained else pool.expert_names[0])
        model.load_state_dict(merged)
        return MergeOutput(model, extras=dict(self.extras))


def merge_sources(method: TensorMergeMethod, base: TensorSource | None, experts: Sequence[TensorSource], *,
                  sink: Sink | MutableMapping[str, torch.Tensor], seed: int = 0, check_values: bool = True,
                  progress: Callable[..., Iterator[Any]] | None = None) -> None:
    """Run `method` over the sources, handing each output tensor to `sink` (a `Sink`, or a dict to fill) in the
    base's key order, then the method's corrections (`finish`)."""
    if not isinstance(sink, Sink):
        sink = DictSink(sink)
    if not experts:
        raise MergebenchError("nothing to merge: no expert models were given")
    if method.requires_base and base is None:
        raise MergebenchError(f"method {method.name!r} needs a pretrained (base) model")
    sources = ([base] if base is not None else []) + list(experts)
    keys = check_compatible(sources)
    ref = sources[0]
    float_keys = [k for k in keys if is_mergeable(ref.dtype(k))]
    method.seed = seed
    method.extras = {}
    stream = MergeStream(float_keys, base, experts, check_values=check_values)
    method.prepare(stream)
    float_set = set(float_keys)
    on_task_vectors = base is not None and type(method)._works_on_task_vectors()
    iterator = progress(keys, desc=f"merging ({method.name})", total=len(keys)) if progress else keys
    for key in iterator:
        if key not in float_set:  # integer buffers are copied, after checking the experts agree
            value = ref.get(key)
            for src in sources[1:]:
                if not torch.equal(src.get(key), value):
                    raise CheckpointError(f"non-floating tensor {key!r} differs between {ref.name} and {src.name}; "
                                          "it cannot be merged")
            sink.write(key, value)
            continue
        if on_task_vectors:
            b, taus = stream.read_task_vectors(key)
            out = method.merge_task_vectors(key, b, taus)
        else:
            b, ex = stream.read(key)
            out = method.merge_tensor(key, b, ex)
        if tuple(out.shape) != tuple(ref.shape(key)):
            raise MergebenchError(f"method {method.name!r} returned shape {list(out.shape)} for {key!r}, "
                                  f"expected {list(ref.shape(key))}")
        sink.write(key, out.to(ref.dtype(key)))
    for key, index, values in method.finish():
        sink.patch(key, index, values.to(ref.dtype(key)))
