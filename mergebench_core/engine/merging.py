"""The streaming merge engine and the base classes of every data-free method.

This module is the public face plugins have always imported (`from mergebench_core.engine.merging import
merge_sources`); each name is defined in the module of its idea, and is re-exported here unchanged:

- `stream`: `MergeStream` (the base's and experts' tensors one block at a time), `Block`, the sinks;
- `data_free`: `TensorMergeMethod`, `TaskVectorMethod`, `MatrixTaskVectorMethod` and `merge_sources`, the loop that
  runs one of them over tensor sources;
- `pool_sources`: `TensorSourcePool` and `pool_source` (a pool's model as a tensor source);
- `file_merges`: what `mergebench merge` checks (`file_merge_refusal`, `checkpoint_task_names`).

Code inside mergebench imports from those modules directly.
"""

from mergebench_core.engine.data_free import (
    MatrixTaskVectorMethod,
    TaskVectorMethod,
    TensorMergeMethod,
    merge_sources,
)
from mergebench_core.engine.file_merges import checkpoint_task_names, file_merge_refusal
from mergebench_core.engine.pool_sources import TensorSourcePool, pool_source
from mergebench_core.engine.stream import DEFAULT_BLOCK_ENTRIES, Block, BlockSink, DictSink, MergeStream, Sink

__all__ = [
    "DEFAULT_BLOCK_ENTRIES", "Block", "BlockSink", "DictSink", "MatrixTaskVectorMethod", "MergeStream", "Sink",
    "TaskVectorMethod", "TensorMergeMethod", "TensorSourcePool", "checkpoint_task_names", "file_merge_refusal",
    "merge_sources", "pool_source",
]
