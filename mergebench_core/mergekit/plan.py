"""Which tensors a MergeKit config writes and where each comes from: whole models, or slices of layers.

MergeKit's own planner works from architecture descriptions; this one works from tensor names, so any model whose
layers are numbered `...layers.<i>....` (also `h.<i>`, `blocks.<i>`: GPT-2, Falcon, MPT) is covered without a
table. Its rules are MergeKit's:
- `models:` is one slice of every model's whole layer range; a `base_model` not among the models is added as a
  source (without parameters);
- output layers are numbered in order across slices; layer i of a slice of n layers takes layer `start + i` of
  each source, at gradient position t = i / (n − 1) (t = 1 for a slice of one layer);
- tensors outside the layers come before them when they hold embeddings (`embed`, `wte`, `wpe` in the name),
  after them otherwise (final norm, output head); the ones before take the first slice's sources, the ones after the
  last slice's, both at t = 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergebench_core.engine.layers import LAYER
from mergebench_core.errors import CheckpointError
from mergebench_core.mergekit.config import MergeKitConfig, MergeKitConfigError, Slice, Source

PRE_WORDS = ("embed", "wte", "wpe")


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its name, the (model, tensor name) it is merged from per source of its slice, the slice
    (for parameter lookups) and its gradient position."""

    out_name: str
    inputs: tuple[tuple[str, str], ...]
    slice_index: int
    t: float


def split_layer(name: str) -> tuple[str, int, str] | None:
    """(prefix, layer index, suffix) of a tensor inside a numbered layer, else None."""
    m = LAYER.search(name)
    return (name[:m.start(1)], int(m.group(1)), name[m.end(1):]) if m else None


def layer_total(keys: Sequence[str]) -> int:
    """How many layers a model's tensor names number (0 when none is inside a layer)."""
    found = [s[1] for s in map(split_layer, keys) if s is not None]
    return max(found) + 1 if found else 0


def effective_config(config: MergeKitConfig, keys: Mapping[str, Sequence[str]]) -> MergeKitConfig:
    """The config with `models:` spelled as a slice of whole layer ranges, and the base added to it when missing."""
    if not config.from_models:
        return config
    sources = list(config.slices[0].sources)
    if config.base_model and all(s.model != config.base_model for s in sources):
        sources.append(Source(config.base_model, None, {}, "base_model"))
    totals = {s.model: layer_total(keys[s.model]) for s in sources}
    if len(set(totals.values())) != 1:
        raise MergeKitConfigError("models: the models have different numbers of layers (" +
                                  ", ".join(f"{m}: {n}" for m, n in totals.items()) +
                                  "); merge equal-depth models, or use slices: with layer_range")
    whole = tuple(dataclasses.replace(s, layer_range=(0, totals[s.model])) for s in sources)
    return dataclasses.replace(config, slices=(Slice(whole, config.slices[0].parameters, "models"),))


def plan_tensors(config: MergeKitConfig, keys: Mapping[str, Sequence[str]]) -> tuple[list[TensorPlan], int]:
    """The output tensors in writing order (before, layers, after) and the output's layer count, for a config
    already through `effective_config`; `keys` holds each model's tensor names in file order."""
    for slc in config.slices:
        for src in slc.sources:
            total = layer_total(keys[src.model])
            assert src.layer_range is not None
            if src.layer_range[1] > total:
                raise MergeKitConfigError(f"{src.where}.layer_range: {list(src.layer_range)} goes past the "
                                          f"{total} layers of {src.model}")
    first = config.slices[0].sources[0]
    outside = [k for k in keys[first.model] if split_layer(k) is None]
    pre = [k for k in outside if any(w in k for w in PRE_WORDS)]
    post = [k for k in outside if k not in pre]
    plans = [_same_name(k, config.slices[0], 0) for k in pre]
    out_layer = 0
    for i, slc in enumerate(config.slices):
        n = slc.sources[0].layer_range[1] - slc.sources[0].layer_range[0]  # type: ignore[index]
        for idx in range(n):
            t = idx / (n - 1) if n > 1 else 1.0
            start = slc.sources[0].layer_range[0]  # type: ignore[index]
            for name in keys[slc.sources[0].model]:
                parts = split_layer(name)
                if parts is None or parts[1] != start + idx:
                    continue
                prefix, _, suffix = parts
                inputs = []
                for src in slc.sources:
                    in_name = f"{prefix}{src.layer_range[0] + idx}{suffix}"  # type: ignore[index]
                    if in_name not in set(keys[src.model]):
                        raise CheckpointError(f"{src.where}: {src.model} has no tensor {in_name!r}, which "
                                              f"{slc.sources[0].model} has in the same layer")
                    inputs.append((src.model, in_name))
                plans.append(TensorPlan(f"{prefix}{out_layer}{suffix}", tuple(inputs), i, t))
            out_layer += 1
    plans += [_same_name(k, config.slices[-1], len(config.slices) - 1) for k in post]
    return plans, out_layer


def _same_name(key: str, slc: Slice, slice_index: int) -> TensorPlan:
    return TensorPlan(key, tuple((s.model, key) for s in slc.sources), slice_index, 0.0)
