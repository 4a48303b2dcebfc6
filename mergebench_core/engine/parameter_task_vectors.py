"""Whole-model task vectors of a pool's parameters, held in memory, for methods whose rule needs every tensor at
once (a threshold over the whole model, an optimisation through the model, a mask learned on data).

Streaming methods use `TaskVectorMethod` instead; these methods (TATR, Localize-and-Stitch, DOGE, Frank-Wolfe
merging) follow their reference implementations, which merge the model's parameters and leave its buffers at the
pretrained values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergebench_core.contract.api import PRETRAINED, Method, ModelPool
from mergebench_core.errors import MergebenchError


@dataclass
class ParameterTaskVectors:
    """The pretrained model, its state, and τ_t = θ_t − θ_0 of every floating parameter, stacked over experts."""

    model: nn.Module
    """The pretrained model (a fresh copy: methods load their result into it)."""
    base: dict[str, torch.Tensor]
    keys: list[str]
    """Names of the floating parameters, in the model's order."""
    taus: dict[str, torch.Tensor]
    """{key: (T, ...)} in float32, experts in pool order."""
    experts: list[str]

    @classmethod
    def of(cls, method: type[Method] | Method, pool: ModelPool) -> ParameterTaskVectors:
        """Task vectors of `pool`'s experts, or the method's refusal as a clear error."""
        refusal = method.refusal(pool, method.params) if isinstance(method, Method) else None
        if refusal:
            raise MergebenchError(f"{method.name} cannot run on pool {pool.name!r}: {refusal}")
        model = pool.load_model(PRETRAINED)
        base = pool.state_dict(PRETRAINED)
        keys = [k for k, _ in model.named_parameters() if k in base and base[k].is_floating_point()]
        experts = list(pool.expert_names)
        states = [pool.state_dict(e) for e in experts]
        taus = {k: torch.stack([s[k].float() - base[k].float() for s in states]) for k in keys}
        return cls(model, base, keys, taus, experts)

    def task(self, i: int) -> dict[str, torch.Tensor]:
        """τ_i as a state dict over `keys`."""
        return {k: v[i] for k, v in self.taus.items()}

    def apply(self, update: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """Load θ_0 (or `base`) + update into the model, cast to each tensor's dtype, and return it."""
        start = self.base if base is None else base
        merged = {k: (start[k].float() + update[k].float()).to(self.base[k].dtype) for k in update}
        self.model.load_state_dict({**self.base, **merged})
        return self.model


def flatten(tensors: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """One vector of `tensors[k]` for k in `keys`, in that order."""
    return torch.cat([tensors[k].reshape(-1) for k in keys])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The inverse of `flatten`: slices of `vector` shaped like `like[k]`."""
    out, offset = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vector[offset:offset + n].view(like[k].shape)
        offset += n
    return out
