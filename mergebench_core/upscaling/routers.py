"""Routers of weight-ensembling mixtures: small networks that map a block's input to one coefficient per expert.

The initialisation follows WEMoE (Tang et al., ICML 2024) as FusionBench 0.2.33 builds it, because it is what makes
the upscaled model start at task arithmetic: every weight ~ N(0, 0.01²), hidden biases 0, and the output bias equal
to `init_lambda`, so that at initialisation every coefficient is ≈ init_lambda whatever the input. The layer names
(`fc1`/`fc2`, `fc`, `weight`) are FusionBench's, so a router's state can be copied between the two for parity tests.
The outputs are used as they are: no softmax (the coefficients are task-arithmetic scales, not a distribution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Router(nn.Module):
    """Coefficients (…, num_outputs) from inputs (…, in_features); depth 0 ignores the input and learns one vector.

    `hidden` is the width of the depth-2 router's hidden layer: `in_features` for WEMoE, 2·num_outputs for
    Rank-One MoE (each paper's choice)."""

    def __init__(self, in_features: int, num_outputs: int, *, hidden_layers: int, init_lambda: float,
                 generator: torch.Generator, hidden: int | None = None):
        super().__init__()
        if hidden_layers not in (0, 1, 2):
            raise ValueError(f"router_hidden_layers must be 0, 1 or 2, got {hidden_layers}")
        self.hidden_layers = hidden_layers
        self.in_features, self.num_outputs = in_features, num_outputs
        if hidden_layers == 0:
            self.weight = nn.Parameter(torch.full((num_outputs,), float(init_lambda)))
            return
        if hidden_layers == 1:
            self.fc = nn.Linear(in_features, num_outputs)
            last = self.fc
        else:
            width = hidden if hidden is not None else in_features
            self.fc1, self.fc2 = nn.Linear(in_features, width), nn.Linear(width, num_outputs)
            with torch.no_grad():
                self.fc1.weight.normal_(0.0, 0.01, generator=generator)
                self.fc1.bias.zero_()
            last = self.fc2
        with torch.no_grad():
            last.weight.normal_(0.0, 0.01, generator=generator)
            last.bias.fill_(float(init_lambda))

    def forward(self, x: Tensor) -> Tensor:
        if self.hidden_layers == 0:
            return self.weight
        if self.hidden_layers == 1:
            return self.fc(x)
        return self.fc2(F.relu(self.fc1(x)))


def per_sample(gates: Tensor) -> Tensor:
    """Token coefficients (N, L, E) averaged over the tokens of each sample (batch first, as in a CLIP encoder);
    per-sample coefficients (N, E) pass through. Routing is per sample: one weight mixture for all of its tokens."""
    return gates.mean(dim=1) if gates.dim() == 3 else gates
