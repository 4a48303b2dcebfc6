"""Named tensors read one at a time: the `TensorSource` protocol every data-free method is written against, its
optional features, the in-memory source, and the check that sources agree before a merge.

A method written once against `TensorSource` runs on any architecture and on checkpoints larger than memory: a source
hands out one tensor at a time. Optional features are declared protocols (`SupportsReadInto`, `SupportsReadSlices`),
never guessed from what an object happens to have.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from mergebench_core.errors import CheckpointError


@runtime_checkable
class TensorSource(Protocol):
    """Named tensors that can be read one at a time."""

    name: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def get(self, key: str) -> torch.Tensor: ...


@runtime_checkable
class SupportsReadInto(Protocol):
    """A source that reads part of a tensor into memory the caller owns (block streaming, no allocation per read)."""

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        """Read `out.numel()` entries of tensor `key`, from flat index `start` on, into `out` (contiguous, the
        tensor's dtype)."""


@runtime_checkable
class SupportsReadSlices(Protocol):
    """A source that reads many short runs of a tensor at once (the samples that `threshold_search` brackets a
    threshold with)."""

    def read_slices(self, key: str, starts: Sequence[int], out: torch.Tensor) -> None:
        """Read `out.shape[1]` entries of tensor `key` from each flat index in `starts` into the rows of `out`."""


class StateDictSource:
    """A state dict already in memory."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "state dict"):
        self.tensors, self.name = tensors, name

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        flat = self.tensors[key].detach().reshape(-1)
        if out.dtype != flat.dtype or start < 0 or start + out.numel() > flat.numel():
            raise ValueError(f"read_into({key!r}) needs a {flat.dtype} tensor of at most {flat.numel() - start} "
                             f"entries, got {out.dtype} {list(out.shape)} from index {start}")
        out.view(-1).copy_(flat[start:start + out.numel()])

    def read_slices(self, key: str, starts: Sequence[int], out: torch.Tensor) -> None:
        flat = self.tensors[key].detach().reshape(-1)
        length = out.shape[1]
        index = (torch.as_tensor(list(starts), dtype=torch.int64).view(-1, 1) + torch.arange(length)).view(-1)
        out.copy_(flat[index.to(flat.device)].view(len(starts), length))


def check_compatible(sources: Sequence[TensorSource], keys: Iterable[str] | None = None) -> list[str]:
    """The keys to merge, after checking every source has the same names and shapes as the first."""
    ref = sources[0]
    ref_keys = list(keys) if keys is not None else ref.keys()
    ref_set = set(ref_keys)
    for src in sources[1:]:
        other = set(src.keys())
        missing = [k for k in ref_keys if k not in other]
        if missing:
            raise CheckpointError(f"{src.name} has no tensor {missing[0]!r}, which {ref.name} has "
                                  f"({len(missing)} missing in all)")
        extra = sorted(other - ref_set) if keys is None else []
        if extra:
            raise CheckpointError(f"{src.name} has a tensor {extra[0]!r} that {ref.name} lacks "
                                  f"({len(extra)} extra in all)")
        for k in ref_keys:
            if src.shape(k) != ref.shape(k):
                raise CheckpointError(f"tensor {k!r} has shape {list(ref.shape(k))} in {ref.name} but "
                                      f"{list(src.shape(k))} in {src.name}")
    return ref_keys
