"""PWE-MoE: Pareto weight-ensembling mixture of experts (Tang et al., "Towards Efficient Pareto Set Approximation via
Mixture of Experts Based Model Fusion", 2024), with the linear-scalarization objective.

Every MLP and attention block (each transformer layer's `mlp` and `self_attn`; in a plain MLP such as the digits
encoder, each Linear layer) becomes θ(r) = θ₀ + Σ_t g_t(r)·τ_t, where the router reads the *preference vector* r
over the tasks instead of the data (depth 2: T → 2T → T, its output bias starting at init_lambda); the weights outside
the blocks are task arithmetic with init_lambda. The routers are trained once on labeled train batches: every step
draws r ~ Dirichlet(α) and minimises Σ_t r_t·L_t (cross-entropy of task t). The one trained model is then
instantiated at each preference of the grid (`--preferences simplex:K`), so a whole front costs one training: the
trained routers are cached (`$MERGEBENCH_CACHE`, keyed by the pool's models, the parameters, the tasks, the seed and
the plugin's version) and every preference cell after the first reuses them.

Defaults are FusionBench 0.2.33's (`config/method/pwe_moe/pwe_moe_ls_for_clip.yaml`): init_lambda 0.3,
router_hidden_layers 2, Adam lr 1e-5, 8,000 steps, batch 16 per task, α = 1 (uniform over the simplex; the only α
implemented here, drawn with the run's seeded generator). The EPO objective (`PWEMoExactParetoOptimalForCLIP`) is not
offered. Parity: `tests/test_pwe_moe.py` matches FusionBench's `ParetoWeightEnsemblingModule` at a fixed preference
within 1e-5.

Cost: T task vectors of every upscaled block stay resident (the family's size is what `params ×` reports), and one
training of 8,000 steps: sweeps over every method leave it out; it runs when named.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mergebench_core import MergebenchError, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.cache import ContentCache, Entry
from mergebench_core.contract.config import params_dict
from mergebench_core.running.data_needs import require_task_pool
from mergebench_core.training.loop import task_losses, train
from mergebench_core.upscaling import PreferenceBlock, Router, TestTimeParams, UpscaleMethod, set_preference
from mergebench_core.upscaling.model import (
    linear_layers,
    replace_module,
    require_targets,
    task_arithmetic_into,
    task_vectors,
)

BLOCK_NAMES = ("mlp", "self_attn")
"""The transformer sub-blocks PWE-MoE upscales (FusionBench's `upscale_mlp` and `upscale_attn`, both on)."""


@dataclass
class Params(TestTimeParams):
    steps: int = 8000
    lr: float = 1e-5
    batch_size: int = 16
    init_lambda: float = 0.3
    router_hidden_layers: int = 2
    alpha: float = 1.0
    """Concentration of the Dirichlet the training preferences are drawn from; 1 (uniform) is the one implemented."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha != 1.0:
            raise ValueError(f"alpha={self.alpha}: only alpha=1 (preferences uniform over the simplex, FusionBench's "
                             f"default) is implemented")
        if self.router_hidden_layers not in (1, 2):
            raise ValueError(f"router_hidden_layers must be 1 or 2, got {self.router_hidden_layers}")


def blocks_of(model: nn.Module) -> list[str]:
    """Each transformer layer's `mlp` and `self_attn`, or, in a model with none, each Linear layer."""
    named = [n for n, _ in model.named_modules() if n.rpartition(".")[2] in BLOCK_NAMES]
    return named or linear_layers(model)


def uniform_simplex(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """One draw from Dirichlet(1, ..., 1): normalised standard exponentials."""
    e = -torch.log(torch.rand(n, generator=generator, device=device).clamp_min(1e-12))
    return e / e.sum()


class PWEMoE(UpscaleMethod):
    """Blocks θ(r) = θ₀ + Σ_t g_t(r)·τ_t routed by the preference; trained once with r ~ Dirichlet(1)."""

    name = "pwe_moe"
    Params = Params
    info = MethodInfo(kind="upscale", data="labeled", task_vectors=True, preference_aware=True,
                      left_out_of_sweeps="one training of 8,000 steps (FusionBench's default); run it by name, "
                                         "with --preferences simplex:K for a front")

    @classmethod
    def targets(cls, model: nn.Module) -> list[str]:
        return blocks_of(model)

    def upscale(self, base: nn.Module, experts: list[nn.Module], ctx: RunContext, skip: set[str]) -> nn.Module:
        p, t = self.params, len(experts)
        names = require_targets(base, blocks_of(base), self.name, "MLP or attention blocks (or Linear layers)")
        pretrained = {n: copy.deepcopy(base.get_submodule(n)) for n in names}
        task_arithmetic_into(base, experts, p.init_lambda, skip)
        base.requires_grad_(False)
        gen = ctx.generator()
        for name in names:
            block = pretrained[name]
            router = Router(t, t, hidden_layers=p.router_hidden_layers, init_lambda=p.init_lambda, generator=gen,
                            hidden=2 * t)
            replace_module(base, name, PreferenceBlock(block, task_vectors(block, [e.get_submodule(name)
                                                                                   for e in experts]), router))
        return base

    def run(self, pool: ModelPool, ctx: RunContext):
        self._pool = pool
        out = super().run(pool, ctx)
        tasks = list(ctx.tasks) or [pool.task_of(e) for e in pool.expert_names]
        weights = ctx.task_weights() or {t: 1.0 / len(tasks) for t in tasks}
        preference = torch.tensor([weights[t] for t in tasks], dtype=torch.float32)
        set_preference(out.model, preference)
        out.extras["preference"] = preference.tolist()
        return out

    def adapt(self, model: nn.Module, trainable: list[nn.Parameter], ctx: RunContext) -> dict[str, object]:
        if self.params.steps == 0:  # the routers as initialised (task arithmetic at every preference)
            return {"trained_parameters": 0, "steps": 0, "routers": "initial"}
        taskpool = require_task_pool(self, ctx.taskpool)
        tasks = tuple(ctx.tasks or taskpool.tasks)
        if len(tasks) != len(self._pool.expert_names):
            raise MergebenchError(f"{self.name}: the router reads one preference weight per expert "
                                  f"({len(self._pool.expert_names)}), and the cell scores {len(tasks)} tasks; "
                                  f"select the same tasks for both (--tasks)")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        cache = ContentCache(ctx.cache_dir / "pwe_moe")
        key = {"method": self.name, "code": ctx.method_version, "params": params_dict(self.params), "seed": ctx.seed,
               "tasks": list(tasks), "models": [self._pool.identity(n) for n in ["_pretrained_",
                                                                                 *self._pool.expert_names]],
               "versions": self._pool.version_info()}
        entry = cache.get(key, "PWE-MoE routers")
        if entry is not None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in entry.tensors:
                        p.copy_(entry.tensors[name])
            return {"trained_parameters": sum(p.numel() for p in trainable), "routers": "cached"}
        if ctx.eval_only:
            raise MergebenchError(f"{self.name}: --eval-only, and no routers were trained with these parameters")
        params = self.params

        def loss(model: nn.Module, batches, state):
            r = uniform_simplex(len(state.tasks), state.generator, state.device)
            set_preference(model, r)
            losses = task_losses(model, batches, state)
            return sum(r[i] * losses[t] for i, t in enumerate(state.tasks))

        result = train(model, taskpool, tasks, loss, params.train_config(), seed=ctx.seed, device=ctx.device,
                       parameters=trainable, log_metrics=ctx.log_metrics, progress=ctx.progress, split="train")
        state = dict(model.named_parameters())
        cache.put(key, Entry({n: state[n].detach().cpu() for n in names}), "PWE-MoE routers")
        return {"trained_parameters": sum(p.numel() for p in trainable), "steps": result.steps,
                "final_loss": result.final_loss, "train_seconds": result.seconds, "routers": "trained"}


@hookimpl
def register_methods(register):
    register(PWEMoE)
