"""Building an upscaled model and measuring it: which modules are upscaled, the swap itself, and its size.

An upscaled model is the pretrained module (what the pool's `load_model` returns) with some submodules replaced by
routed blocks (`upscaling.blocks`): it is an `nn.Module` with the base's interface, so every task pool scores it
unchanged. Its size against the base, `params ×` in the tables, counts every tensor the model holds (parameters and
buffers, each storage once): the experts' task vectors are buffers, yet they are what the model costs in memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mergebench_core.errors import MergebenchError

MLP_NAME = "mlp"
"""The name transformer blocks give their MLP (CLIP's `encoder.layers.N.mlp`, ViT's, OpenCLIP's)."""


def count_parameters(model: nn.Module) -> int:
    """Every entry of every tensor `model` holds, parameters and buffers alike, each shared tensor once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel()
    return total


def size_report(model: nn.Module, base: nn.Module) -> dict[str, float]:
    """What the harness stores with an upscaled cell: its size, the base's, and their ratio (`params ×`)."""
    n, n0 = count_parameters(model), count_parameters(base)
    return {"parameters": n, "base_parameters": n0, "params_ratio": n / n0 if n0 else math.nan}


def linear_layers(model: nn.Module) -> list[str]:
    """Every `nn.Linear` of the model, by name, in module order (SMILE upscales all of them)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]


def mlp_blocks(model: nn.Module) -> list[str]:
    """The modules WEMoE and its variants upscale: each transformer block's MLP (a module named `mlp`); a model with
    none (the digits encoder, a plain MLP) has each of its Linear layers taken as one block."""
    named = [name for name, _ in model.named_modules() if name.rpartition(".")[2] == MLP_NAME]
    return named or linear_layers(model)


def submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def require_targets(model: nn.Module, names: list[str], method: str, what: str) -> list[str]:
    if not names:
        raise MergebenchError(f"{method} upscales {what}, and the pool's model ({type(model).__name__}) has none; "
                              f"choose a pool whose model has them (CLIP, ViT, an MLP such as digits-mlp_TA8)")
    return names


def task_vectors(base: nn.Module, experts: list[nn.Module]) -> dict[str, Tensor]:
    """{parameter name: (T, *shape)} τ_t = θ_t − θ₀ of one module, over its parameters (buffers are not weights)."""
    own = dict(base.named_parameters())
    out = {}
    for name, p0 in own.items():
        rows = [dict(e.named_parameters())[name].detach().float() - p0.detach().float() for e in experts]
        out[name] = torch.stack(rows)
    return out


@torch.no_grad()
def task_arithmetic_into(model: nn.Module, experts: list[nn.Module], scale: float, skip: set[str]) -> None:
    """θ ← θ₀ + scale·Σ_t τ_t, in place, for every parameter of `model` (the pretrained model) not in `skip` (the
    running statistics of batch norm, which stay the base's). WEMoE's and Rank-One MoE's weights outside the upscaled
    blocks (init_lambda 0.3: task arithmetic)."""
    expert_params = [dict(e.named_parameters()) for e in experts]
    for name, p in model.named_parameters():
        if name in skip or not p.is_floating_point():
            continue
        tau = sum(e[name].detach().float() - p.detach().float() for e in expert_params)
        p.copy_((p.float() + scale * tau).to(p.dtype))


def frozen(model: nn.Module) -> nn.Module:
    """The model with no parameter trainable: the routers are switched back on by the method that trains them."""
    return model.requires_grad_(False)


def input_width(block: nn.Module) -> int:
    """The width of a block's input: its first Linear's `in_features` (a router reads what the block reads)."""
    for m in block.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise MergebenchError(f"block {type(block).__name__} has no Linear layer to read its input width from")


def quantile(values: Tensor, q: float) -> Tensor:
    """`torch.quantile(values, q)` (linear interpolation between order statistics) for tensors of any size:
    torch.quantile refuses inputs above 16 M entries, a CLIP-L MLP task vector has more."""
    flat = values.flatten().float()
    pos = q * (flat.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    low = flat.kthvalue(lo + 1).values
    high = low if hi == lo else flat.kthvalue(hi + 1).values
    return low + (pos - lo) * (high - low)


def magnitude_prune(tau: Tensor, ratio: float) -> Tensor:
    """τ with the entries whose magnitude is not above the `ratio` quantile of |τ| set to 0 (E-WEMoE's rule, per
    tensor: ratio 0.9 keeps about the largest 10 %)."""
    if ratio <= 0:
        return tau
    magnitude = tau.abs()
    return tau * (magnitude > quantile(magnitude, ratio))
