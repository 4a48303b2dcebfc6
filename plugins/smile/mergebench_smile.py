"""SMILE: Sparse Mixture of Low-Rank Experts (Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts
Construction From Pre-Trained Foundation Models", 2024). Training-free and data-free.

Every Linear layer of the pretrained model becomes y = W₀x + b₀ + Σ_{t ∈ top-k(x)} w_t(x)·(U_t S_t V_tᵀ x + Δb_t):
expert t is the rank-k truncation of the task vector τ_t = W_t − W₀ (with the bias difference Δb_t), and the router,
per token, scores expert t by ‖V_t[:, :gate_k]ᵀ x‖ — how much of the input lies in the input directions the
fine-tuning changed most — then softmax over the experts, keeps the top_k and renormalises their weights. Every
other tensor (LayerNorm, embeddings, convolutions) stays the pretrained one (`average_experts: false`).

Defaults are FusionBench 0.2.33's (`config/method/smile_upscaling/smile_upscaling.yaml`): gate_k 1, k 128, top_k 1,
routing on the weight differences (`routing_use_diff: true`). k and gate_k are clipped to a layer's smaller side
(FusionBench's module fails when k exceeds it: the digits encoder's layers have 64 to 256 inputs, so k = 128 keeps
the whole task vector of the 64-input first layer). Parity: `tests/test_smile.py` matches FusionBench's
`SmileMoELinear` outputs within 1e-5.

Cost: per Linear and task k·(out + in) + out numbers, plus T·gate_k·in for the router; CLIP-ViT-B/32 with 8
experts and k = 128: 2.96 × the base's parameters (k = 32: 1.50 ×). Each token runs its top_k experts' two thin
matmuls besides the base layer. It takes seconds on the embedded pool (one SVD per layer and task).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mergebench_core import MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.upscaling import SmileLinear, UpscaleMethod, linear_layers
from mergebench_core.upscaling.model import replace_module, require_targets


@dataclass
class Params:
    gate_k: int = 1
    """Right singular vectors of each τ_t the router projects on."""
    k: int = 128
    """Rank of each expert (the top singular components of τ_t); clipped to the layer's smaller side."""
    top_k: int = 1
    """Experts each token is routed to."""

    def __post_init__(self) -> None:
        if self.gate_k < 1 or self.k < 1 or self.top_k < 1:
            raise ValueError(f"gate_k, k and top_k must be >= 1, got {self.gate_k}, {self.k}, {self.top_k}")


@torch.no_grad()
def smile_layer(base: nn.Linear, experts: list[nn.Linear], gate_k: int, k: int, top_k: int) -> SmileLinear:
    """The SMILE mixture of one Linear layer from its pretrained and fine-tuned versions."""
    gates, us, svhs = [], [], []
    for e in experts:
        tau = e.weight.float() - base.weight.float()
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        r = s.numel()
        gates.append(vh[:min(gate_k, r)])
        us.append(u[:, :min(k, r)])
        svhs.append(s[:min(k, r), None] * vh[:min(k, r)])
    dtype = base.weight.dtype
    bias = None
    if base.bias is not None:
        bias = torch.stack([e.bias.float() - base.bias.float() for e in experts]).to(dtype)
    return SmileLinear(base, torch.cat(gates).to(dtype), torch.stack(us).to(dtype), torch.stack(svhs).to(dtype),
                       bias, top_k)


class Smile(UpscaleMethod):
    """Every Linear layer becomes a top-k routed mixture of the rank-k truncations of its task vectors."""

    name = "smile"
    Params = Params
    info = MethodInfo(kind="upscale", data="none", task_vectors=True)
    upscales = "Linear layers"

    @classmethod
    def targets(cls, model: nn.Module) -> list[str]:
        return linear_layers(model)

    @classmethod
    def refusal(cls, pool: ModelPool, params: Params) -> str | None:
        if params.top_k > len(pool.expert_names):
            return (f"top_k={params.top_k} routes each token to more experts than pool {pool.name!r} has "
                    f"({len(pool.expert_names)}); set smile.top_k to at most that")
        return super().refusal(pool, params)

    def upscale(self, base: nn.Module, experts: list[nn.Module], ctx: RunContext, skip: set[str]) -> nn.Module:
        p = self.params
        names = require_targets(base, self.targets(base), self.name, self.upscales)
        base.requires_grad_(False)
        for name in names:
            layer = smile_layer(base.get_submodule(name), [e.get_submodule(name) for e in experts],
                                p.gate_k, p.k, p.top_k)
            replace_module(base, name, layer)
        return base


@hookimpl
def register_methods(register):
    register(Smile)
