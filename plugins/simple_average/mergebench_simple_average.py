"""Simple averaging: θ = mean over experts of θ_t (Wortsman et al., 2022, "Model soups", uniform soup)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, TensorMergeMethod, hookimpl


@dataclass
class Params:
    """Simple averaging has no parameters."""


class SimpleAverage(TensorMergeMethod):
    """Uniform average of the experts' weights (the base model is not used)."""

    name = "simple_average"
    Params = Params
    info = MethodInfo(kind="merge", data="none")
    requires_base = False
    blockwise = True  # element-wise: large tensors stream in blocks

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([e.to(torch.float32) for e in experts]).mean(0)


@hookimpl
def register_methods(register):
    register(SimpleAverage)
