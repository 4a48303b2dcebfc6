"""Which layer of a model each tensor belongs to, from tensor names alone: the depth that depth-dependent methods
(LiNeS's layer-increasing scaling) read, and the numbered layers MergeKit's slices count.

Transformers and other deep models number their blocks in tensor names (`encoder.layers.3.`, `h.3.`,
`transformer.resblocks.3.`, `blocks.3.`): a tensor inside one has that block's index as its depth, and every other
tensor (embeddings, the final norm, a projection) has none, as LiNeS treats them. A model without numbered blocks
(a plain MLP: `fc1.weight`, `fc2.weight`, `norm.weight`) counts each module as one layer instead, in the order its
tensors first appear (the order of the state dict, which follows the forward definition for `nn.Module`s).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer|resblocks)\.(\d+)\.")
"""A numbered block inside a tensor name; group 1 is its index."""


def numbered_layer(name: str) -> int | None:
    """The index of the numbered block that holds tensor `name`, or None."""
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class LayerDepths:
    """Every tensor's depth (None: outside the numbered layers) and how many layers there are."""

    depth: dict[str, int | None]
    count: int
    numbered: bool
    """True when the depths come from numbered blocks; False when each module counts as a layer."""

    def fraction(self, key: str) -> float | None:
        """depth / (count − 1): 0 for the first layer, 1 for the last (0 when there is one layer), None outside."""
        d = self.depth.get(key)
        if d is None:
            return None
        return d / (self.count - 1) if self.count > 1 else 0.0


def layer_depths(keys: Sequence[str]) -> LayerDepths:
    """The depths of `keys` (see the module docstring for the two rules)."""
    numbered = {k: numbered_layer(k) for k in keys}
    found = [d for d in numbered.values() if d is not None]
    if found:
        return LayerDepths(numbered, max(found) + 1, True)
    modules: dict[str, int] = {}
    depth: dict[str, int | None] = {}
    for key in keys:
        module = key.rpartition(".")[0]
        depth[key] = modules.setdefault(module, len(modules))
    return LayerDepths(depth, len(modules), False)
