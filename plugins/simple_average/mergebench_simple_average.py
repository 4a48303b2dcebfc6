"""Simple averaging: θ = mean over experts of θ_t (Wortsman et al., 2022, "Model soups", uniform soup)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, TensorMergeMethod, hookimpl
from mergebench_core.engine.averaging import mean_tensor


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
        return mean_tensor(experts)


@hookimpl
def register_methods(register):
    register(SimpleAverage)
