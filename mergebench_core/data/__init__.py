"""Models meet data: seeded batches (`batches`), the one evaluation loop (`evaluation`), task metrics and splits,
and the data statistics merging methods share (`statistics`: Fisher diagonals, Gram matrices).

`shuffled_batches` is re-exported here because `mergebench_core.data` was its module before the core had rooms."""

from mergebench_core.data.batches import shuffled_batches

__all__ = ["shuffled_batches"]
