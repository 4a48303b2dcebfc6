"""Exact magnitude top-k selection, per tensor or over a whole model streamed tensor by tensor.

This module is the public face plugins have always imported (`from mergebench_core.engine.sparsify import
keep_count, topk_mask`); each name is defined in the module of its idea, and is re-exported here unchanged:

- `exact_topk`: `keep_count`, `topk_mask` / `bottomk_mask` over a tensor in memory, the streamed radix select
  `StreamingTopK`, and `Thresholds`, a selection applied to blocks of any size;
- `threshold_search`: the sampled bracket and the one counting pass that find exact thresholds (`sample_plan`,
  `build_sample`, `bracket_thresholds`, `find_thresholds`).

Code inside mergebench imports from those modules directly.
"""

from mergebench_core.engine.exact_topk import (
    StreamingTopK,
    Thresholds,
    bottomk_mask,
    keep_count,
    magnitude_bits,
    topk_mask,
)
from mergebench_core.engine.threshold_search import (
    Bracket,
    Sample,
    bracket_thresholds,
    build_sample,
    find_thresholds,
    sample_plan,
)

__all__ = [
    "Bracket", "Sample", "StreamingTopK", "Thresholds", "bottomk_mask", "bracket_thresholds", "build_sample",
    "find_thresholds", "keep_count", "magnitude_bits", "sample_plan", "topk_mask",
]
