"""Passthrough (MergeKit 0.1.5's `passthrough`): one model's tensors copied unchanged, or multiplied by `scale`.

In a MergeKit config it is the slicing itself (frankenmerges stack layer ranges of several models); the config path
does that in `mergebench_core.mergekit.run`, with the same rule. Registered as a method it makes the rule usable by
name: `mergebench merge --method passthrough model.safetensors --out x.safetensors method.scale=0.5`, or on a pool
`passthrough.model=NAME` (one expert, as its own reference row shows it, or scaled). On a pool with more than one
expert it must be told which; the grid over every method skips it there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergebench_core import MergebenchError, MergeStream, MethodInfo, ModelPool, TensorMergeMethod, hookimpl


@dataclass
class Params:
    model: str | None = None
    """The model copied; None uses the only one given."""
    scale: float = 1.0
    """Every floating-point tensor is multiplied by this (MergeKit's `scale`)."""


class Passthrough(TensorMergeMethod):
    """One model's weights, copied (times `scale`)."""

    name = "passthrough"
    Params = Params
    info = MethodInfo(kind="merge", data="none")
    requires_base = False
    blockwise = True  # a copy is entry by entry

    @classmethod
    def refusal(cls, pool: ModelPool, params: Params) -> str | None:
        return _wrong_choice(params.model, pool.expert_names) or super().refusal(pool, params)

    def select_experts(self, names: Sequence[str]) -> list[str]:
        wrong = _wrong_choice(self.params.model, names)
        if wrong:
            raise MergebenchError(wrong)
        self.chosen = self.params.model or names[0]
        return [self.chosen]

    def prepare(self, stream: MergeStream) -> None:
        if stream.num_experts != 1:
            raise MergebenchError(f"passthrough copies one model, but {stream.num_experts} were given; name one with "
                                  f"passthrough.model=NAME")
        if getattr(self, "chosen", None):
            self.extras["model"] = self.chosen

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        value = experts[0]
        return value * self.params.scale if self.params.scale != 1.0 else value


def _wrong_choice(chosen: str | None, names: Sequence[str]) -> str | None:
    if chosen is None:
        if len(names) != 1:
            return (f"passthrough copies one model, but {len(names)} were given: {', '.join(names)}. Name one with "
                    f"passthrough.model=NAME")
        return None
    if chosen not in names:
        return f"passthrough.model names {chosen!r}, which is not among the models: {', '.join(names)}"
    return None


@hookimpl
def register_methods(register):
    register(Passthrough)
