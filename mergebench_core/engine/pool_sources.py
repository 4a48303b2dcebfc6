"""A model pool's models as tensor sources, so that merges and the running-statistics rule read one tensor at a time.

Kept apart from `sources` because it is the one place where tensor sources meet the plugin contract (`ModelPool`):
readers and writers of checkpoint files need no pool.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from mergebench_core.contract.api import ModelPool
from mergebench_core.engine.sources import StateDictSource, TensorSource


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
