"""Rank-One MoE (Yi, Yang et al., "Towards Efficient Pareto Set Approximation via Mixture of Low-Rank Experts" line
of work; code: github.com/EnnengYang/RankOne-MoE, as FusionBench 0.2.33 ships it).

Every Linear weight of every MLP block (each transformer layer's `mlp`; in a plain MLP such as the digits encoder,
each Linear layer) is decomposed per task: τ_t = Σ_j s_tj u_tj v_tjᵀ, and its top `rank_k` singular components
become rank-one experts, K = T·rank_k per block. A router on the block's input (averaged over its tokens) gives one
coefficient per expert, and per sample W(x) = W₀ + Σ_k g_k(x)·s_k u_k v_kᵀ; the same coefficients weigh the
components of every weight of the block. The block's biases, and every weight outside the blocks, are task
arithmetic with init_lambda. The router's output bias starts at init_lambda (so the start is task arithmetic on the
top-rank_k part of each τ) and is trained at test time on the tasks' prediction entropy, as WEMoE's.

Defaults are FusionBench 0.2.33's (`config/method/rankone_moe/rankone_moe.yaml`): rank_k 32, select_k -1 (every
expert; k > 0 keeps the k largest coefficients softly), router_hidden_layers 1 (a linear router; depth 2 has a hidden
width of 2·K), init_lambda 0.3, Adam lr 1e-4, 1,000 steps, batch 16 per task (`batch_reduce: true` while training).
rank_k is clipped to a weight's smaller side. Parity: `tests/test_rankone_moe.py` matches FusionBench's `RankOneMoE`
(forward per sample and batch-reduced, and one entropy step's router gradients) within 1e-5.

Cost: per block and task rank_k·(out + in) numbers per weight, plus the router: on CLIP-ViT-B/32 with 8 experts
1.30 × the base's parameters. 1,000 test-time steps take about a minute on the embedded pool, so sweeps over every
method leave it out; it runs when named.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from mergebench_core import MethodInfo, RunContext, hookimpl
from mergebench_core.upscaling import RankOneBlock, Router, TestTimeParams, UpscaleMethod, mlp_blocks
from mergebench_core.upscaling.model import (
    input_width,
    replace_module,
    require_targets,
    task_arithmetic_into,
    task_vectors,
)


@dataclass
class Params(TestTimeParams):
    rank_k: int = 32
    """Rank-one experts per task and weight: the top singular components of τ_t."""
    select_k: int = -1
    """Coefficients kept (softly) per sample; -1 keeps all T·rank_k."""
    init_lambda: float = 0.3
    """Initial coefficient of every expert, and the task-arithmetic scale of biases and weights outside the blocks."""
    router_hidden_layers: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank_k < 1 or self.select_k == 0 or self.select_k < -1:
            raise ValueError(f"rank_k must be >= 1 and select_k -1 or >= 1, got {self.rank_k}, {self.select_k}")
        if self.router_hidden_layers not in (0, 1, 2):
            raise ValueError(f"router_hidden_layers must be 0, 1 or 2, got {self.router_hidden_layers}")


def rank_one_factors(taus: torch.Tensor, rank_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, SV): (T·k, out) left vectors and (T·k, in) right vectors scaled by their singular values, task-major, for
    task vectors (T, out, in); k = min(rank_k, out, in). Each product u s vᵀ is unaffected by the SVD's signs."""
    us, svs = [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau.float(), full_matrices=False)
        k = min(rank_k, s.numel())
        us.append(u[:, :k].T)
        svs.append(s[:k, None] * vh[:k])
    return torch.cat(us), torch.cat(svs)


class RankOneMoE(UpscaleMethod):
    """MLP weights become W₀ + Σ_k g_k(x)·s_k u_k v_kᵀ over the top rank_k components of every task vector."""

    name = "rankone_moe"
    Params = Params
    info = MethodInfo(kind="upscale", data="unlabeled", task_vectors=True,
                      left_out_of_sweeps="1,000 test-time training steps (FusionBench's default) take about a minute "
                                         "on the embedded pool; run it by name (`-m rankone_moe`)")

    def upscale(self, base: nn.Module, experts: list[nn.Module], ctx: RunContext, skip: set[str]) -> nn.Module:
        p = self.params
        names = require_targets(base, mlp_blocks(base), self.name, "MLP blocks (or Linear layers)")
        pretrained = {n: copy.deepcopy(base.get_submodule(n)) for n in names}
        task_arithmetic_into(base, experts, p.init_lambda, skip)
        base.requires_grad_(False)
        gen = ctx.generator()
        for name in names:
            block = pretrained[name]
            taus = task_vectors(block, [e.get_submodule(name) for e in experts])
            linear = {f"{m}.weight" if m else "weight" for m, mod in block.named_modules()
                      if isinstance(mod, nn.Linear)}
            factors = {k: rank_one_factors(v, p.rank_k) for k, v in taus.items() if k in linear}
            sizes = {f[0].shape[0] for f in factors.values()}
            if len(sizes) != 1:
                raise ValueError(f"{self.name}: the Linear weights of block {name!r} have different ranks below "
                                 f"rank_k={p.rank_k}; lower rank_k to at most the smallest side of its weights")
            experts_k = sizes.pop()
            offsets = {k: p.init_lambda * v.sum(0) for k, v in taus.items() if k not in linear}
            router = Router(input_width(block), experts_k, hidden_layers=p.router_hidden_layers,
                            init_lambda=p.init_lambda, generator=gen, hidden=2 * experts_k)
            replace_module(base, name, RankOneBlock(block, factors, offsets, router, select_k=p.select_k))
        return base


@hookimpl
def register_methods(register):
    register(RankOneMoE)
