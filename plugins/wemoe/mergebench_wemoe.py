"""Weight-Ensembling MoE (Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts", ICML
2024) and its sparse variant E-WEMoE (Shen et al., "Efficient and Effective Weight-Ensembling Mixture of Experts for
Multi-Task Model Merging", 2024).

`wemoe`: every MLP block of the pretrained model (each transformer layer's `mlp`; in a plain MLP such as the digits
encoder, each Linear layer) becomes a routed block whose weights are, per sample, W(x) = W₀ + Σ_t g_t(x)·τ_t, with
τ_t the expert's change of that block and g a depth-2 router (hidden width = input width, ReLU, no softmax) on the
block's input tokens, averaged over the tokens. The router's output bias starts at init_lambda and its weights at
N(0, 0.01²), so the model starts at (almost exactly) task arithmetic; every weight outside the blocks is task
arithmetic with the same λ. The routers are then trained at test time: the sum over tasks of the prediction entropy
on unlabeled test batches, with the coefficients averaged over each batch while training (FusionBench's
`batch_reduce: true`) and per sample when scored.

`sparse_wemoe`: the same with every task vector pruned per tensor, keeping the entries with |τ| above the
`tv_prune_ratio` = 0.9 quantile of |τ| (about 10 %), and one router shared by all blocks (`shared_gate: true`; on a
model whose blocks read inputs of different widths, one shared router per width). FusionBench's other switches
(`post_sparse_gate`, `gate_prune_ratio`, `position_encoding`) are off by default there and not offered here.

Defaults are FusionBench 0.2.33's (`config/method/wemoe/weight_ensembling_moe.yaml` and
`sparse_weight_ensembling_moe.yaml`): router_hidden_layers 2, init_lambda 0.3, Adam lr 1e-4, 1,000 steps, batch 16
per task. Parity: `tests/test_wemoe.py` matches FusionBench's `WeightEnsemblingMoE` and
`SparseWeightEnsemblingMoE_ShardGate` (forward, per sample and batch-reduced, and the gradients of one entropy step)
within 1e-5 where fusion-bench installs.

Cost: T task vectors of every MLP block stay resident (CLIP-ViT-B/32 with 8 experts: 6.27 × the base's parameters;
E-WEMoE stores them dense here, so the same size). 1,000 test-time steps take minutes on the embedded pool, so sweeps
over every method leave both out; they run when named.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from mergebench_core import MethodInfo, RunContext, hookimpl
from mergebench_core.upscaling import Router, TestTimeParams, UpscaleMethod, WeightEnsemblingBlock, mlp_blocks
from mergebench_core.upscaling.model import (
    input_width,
    magnitude_prune,
    replace_module,
    require_targets,
    task_arithmetic_into,
    task_vectors,
)

SLOW = ("1,000 test-time training steps (FusionBench's default) take minutes on the embedded pool; "
        "run it by name (`-m {name}`, or `{name}.steps=100` for a quick look)")


@dataclass
class Params(TestTimeParams):
    init_lambda: float = 0.3
    """Initial routing coefficient, and the task-arithmetic scale of every weight outside the upscaled blocks."""
    router_hidden_layers: int = 2
    """0 (one learned vector per block), 1 (linear) or 2 (Linear-ReLU-Linear, hidden width = input width)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.router_hidden_layers not in (0, 1, 2):
            raise ValueError(f"router_hidden_layers must be 0, 1 or 2, got {self.router_hidden_layers}")


@dataclass
class SparseParams(Params):
    tv_prune_ratio: float = 0.9
    """Per tensor, the entries of τ whose magnitude is not above this quantile of |τ| are set to 0."""
    shared_gate: bool = True
    """One router for every block (per input width) instead of one per block."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.tv_prune_ratio < 1.0:
            raise ValueError(f"tv_prune_ratio must be in [0, 1), got {self.tv_prune_ratio}")


class WEMoE(UpscaleMethod):
    """MLP blocks become W(x) = W₀ + Σ_t g_t(x)·τ_t, routers trained on test-time entropy."""

    name = "wemoe"
    Params = Params
    info = MethodInfo(kind="upscale", data="unlabeled", task_vectors=True, left_out_of_sweeps=SLOW.format(name="wemoe"))

    def prune(self, tau: torch.Tensor) -> torch.Tensor:
        return tau

    def upscale(self, base: nn.Module, experts: list[nn.Module], ctx: RunContext, skip: set[str]) -> nn.Module:
        p = self.params
        names = require_targets(base, mlp_blocks(base), self.name, "MLP blocks (or Linear layers)")
        pretrained = {n: copy.deepcopy(base.get_submodule(n)) for n in names}
        task_arithmetic_into(base, experts, p.init_lambda, skip)
        base.requires_grad_(False)
        gen, shared = ctx.generator(), {}
        for name in names:
            block = pretrained[name]
            taus = {k: torch.stack([self.prune(t) for t in v])
                    for k, v in task_vectors(block, [e.get_submodule(name) for e in experts]).items()}
            width = input_width(block)
            router = shared.get(width) if self.shares_router else None
            if router is None:
                router = Router(width, len(experts), hidden_layers=p.router_hidden_layers,
                                init_lambda=p.init_lambda, generator=gen)
                shared[width] = router
            replace_module(base, name, WeightEnsemblingBlock(block, taus, router))
        return base

    @property
    def shares_router(self) -> bool:
        return False


class SparseWEMoE(WEMoE):
    """E-WEMoE: task vectors pruned per tensor at the 0.9 quantile of |τ|, one router shared by every block."""

    name = "sparse_wemoe"
    Params = SparseParams
    info = MethodInfo(kind="upscale", data="unlabeled", task_vectors=True,
                      left_out_of_sweeps=SLOW.format(name="sparse_wemoe"))

    def prune(self, tau: torch.Tensor) -> torch.Tensor:
        return magnitude_prune(tau, self.params.tv_prune_ratio)

    @property
    def shares_router(self) -> bool:
        return bool(self.params.shared_gate)


@hookimpl
def register_methods(register):
    register(WEMoE)
    register(SparseWEMoE)
