"""What an architecture's owner declares about its permutation symmetries: `PermutationSpec` (which tensor axes share
a permutation of hidden units, with attention-head blocks, activation points and feature axes) and its fusion
`Level`s.

These are part of the contract between a model pool (`ModelPool.permutation_spec()`) and the fusion methods, so they
live with the other nouns and depend on nothing else in the core; `mergebench_core.fusion.alignment` applies and
finds permutations from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from mergebench_core.errors import MergebenchError


@dataclass(frozen=True)
class Level:
    """One step of level-by-level fusion (HF/KF linear fusion, ALF): a submodule of the model whose input comes from
    the fused model built so far and whose output the fused level must reproduce.

    `module` is a name from `model.named_modules()`; the level's input is the module's first positional argument,
    its output the module's output, with features on the axis `PermutationSpec.feature_axes` gives the module (last by
    default). `residual`: the module adds its input to what it computes (a transformer block), so its output units
    must stay in its input's order; fusion methods then match their target units to the input's units.
    """

    module: str
    residual: bool = False


@dataclass(frozen=True)
class PermutationSpec:
    """For each tensor key, the permutation acting on each of its axes (None: that axis is not permuted).

    An MLP layer: `fc1.weight: ("P0", None)`, `fc1.bias: ("P0",)`, `fc2.weight: ("P1", "P0")`; a LayerNorm after
    fc1 shares fc1's permutation: `("P0",)` for its weight and bias. Keys the spec does not name are never permuted.

    The optional fields describe the architecture further, for the methods that need more than weights:
    - `blocks`: {permutation: units per block} for permutations that move contiguous blocks of an axis together
      (attention heads: a permutation of H heads acts on an axis of H · head_dim entries); `sizes` counts blocks.
    - `points`: {permutation: modules whose outputs carry its units on their feature axis}, for activation-based
      alignment (Git Re-Basin's activation matching, OTFusion's activation cost); several modules (the residual
      stream after each block) contribute rows to one permutation.
    - `feature_axes`: {module: axis of its output that holds features} where it is not the last (1 for NCHW convs).
    - `levels`: the model's fusion levels in forward order (`Level`), the last one producing the model's output.
    """

    axes: Mapping[str, tuple[str | None, ...]]
    blocks: Mapping[str, int] = field(default_factory=dict)
    points: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    feature_axes: Mapping[str, int] = field(default_factory=dict)
    levels: tuple[Level, ...] = ()

    def __post_init__(self) -> None:  # a read-only copy: a spec is shared by every method that aligns a pool
        object.__setattr__(self, "axes", MappingProxyType({k: tuple(v) for k, v in self.axes.items()}))
        object.__setattr__(self, "blocks", MappingProxyType({k: int(v) for k, v in self.blocks.items()}))
        object.__setattr__(self, "points", MappingProxyType(
            {k: (v,) if isinstance(v, str) else tuple(v) for k, v in self.points.items()}))
        object.__setattr__(self, "feature_axes", MappingProxyType(dict(self.feature_axes)))
        object.__setattr__(self, "levels", tuple(Level(x) if isinstance(x, str) else x for x in self.levels))
        names = set(self.perms)
        for what, mapping in (("blocks", self.blocks), ("points", self.points)):
            unknown = set(mapping) - names
            if unknown:
                raise ValueError(f"{what} name permutations that no axis carries: {sorted(unknown)}")
        bad = {p: b for p, b in self.blocks.items() if b < 1}
        if bad:
            raise ValueError(f"block sizes must be at least 1: {bad}")

    @property
    def perms(self) -> dict[str, list[tuple[str, int]]]:
        """{permutation name: [(key, axis), ...]}, in the spec's key order."""
        out: dict[str, list[tuple[str, int]]] = {}
        for key, names in self.axes.items():
            for axis, p in enumerate(names):
                if p is not None:
                    out.setdefault(p, []).append((key, axis))
        return out

    def block(self, perm: str) -> int:
        """Entries of an axis per unit of `perm` (1 unless the permutation moves blocks, such as attention heads)."""
        return self.blocks.get(perm, 1)

    def feature_axis(self, module: str) -> int:
        return self.feature_axes.get(module, -1)

    def validate(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Raise a `MergebenchError` naming the key unless every key exists with the declared rank and all axes of
        each permutation have one size (a wrong spec would otherwise fail deep inside an index_select)."""
        for key, names in self.axes.items():
            if key not in state_dict:
                raise MergebenchError(f"permutation spec names tensor {key!r}, which the state dict lacks; fix the "
                                      f"pool's permutation_spec() (state dict keys: {', '.join(list(state_dict)[:8])}"
                                      f"{', ...' if len(state_dict) > 8 else ''})")
            if state_dict[key].dim() != len(names):
                raise MergebenchError(f"permutation spec gives tensor {key!r} {len(names)} axes {names}, but it has "
                                      f"shape {tuple(state_dict[key].shape)}; give one entry (or None) per axis")
        for p, where in self.perms.items():
            sizes = {f"{k}[{a}]": state_dict[k].shape[a] for k, a in where}
            if len(set(sizes.values())) > 1:
                raise MergebenchError(f"permutation {p!r} acts on axes of different sizes {sizes}; each axis that "
                                      f"shares a permutation must hold the same hidden units")
            size, block = next(iter(sizes.values())), self.block(p)
            if size % block:
                raise MergebenchError(f"permutation {p!r} moves blocks of {block} entries, but its axes hold {size} "
                                      f"entries, not a multiple of {block}")

    def validate_model(self, model: nn.Module) -> None:
        """`validate` on the model's state dict, and every point and level names one of its submodules."""
        self.validate(model.state_dict())
        modules = dict(model.named_modules())
        named = [m for ms in self.points.values() for m in ms] + [lv.module for lv in self.levels] + \
            list(self.feature_axes)
        missing = sorted({m for m in named if m not in modules})
        if missing:
            raise MergebenchError(f"permutation spec names modules {missing} that the model lacks; use names from "
                                  f"model.named_modules(), e.g. {', '.join(list(modules)[1:6])}")

    def sizes(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """{permutation name: number of units (blocks) it permutes}."""
        self.validate(state_dict)
        return {p: state_dict[k].shape[a] // self.block(p) for p, ((k, a), *_) in self.perms.items()}


def mlp_permutation_spec(layers: Sequence[str], *, norms: Mapping[str, str] | None = None,
                         bias: bool = True) -> PermutationSpec:
    """The spec of a chain of `nn.Linear` modules (`layers`, in forward order, with elementwise activations between
    them): the outputs of every layer but the last carry a permutation `P_<layer>`, which also permutes the next
    layer's inputs. The last layer's outputs (the model's output) and the first layer's inputs stay put.

    `norms` maps a layer to a LayerNorm (or other per-feature affine module) applied to its outputs, whose weight and
    bias then share that layer's permutation.
    """
    if len(layers) < 2:
        raise ValueError("a chain needs at least two layers to have a hidden permutation")
    norms = dict(norms or {})
    unknown = set(norms) - set(layers)
    if unknown:
        raise ValueError(f"norms name layers that are not in the chain: {sorted(unknown)}")
    axes: dict[str, tuple[str | None, ...]] = {}
    previous: str | None = None
    for i, layer in enumerate(layers):
        out = f"P_{layer}" if i < len(layers) - 1 else None
        axes[f"{layer}.weight"] = (out, previous)
        if bias:
            axes[f"{layer}.bias"] = (out,)
        if layer in norms:
            axes[f"{norms[layer]}.weight"] = (out,)
            axes[f"{norms[layer]}.bias"] = (out,)
        previous = out
    return PermutationSpec(axes)
