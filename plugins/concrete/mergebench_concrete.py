"""Concrete subspace learning (Tang et al., "Concrete Subspace Learning based Interference Elimination for
Multi-task Model Fusion", 2023), as FusionBench 0.2.33 implements it (`fusion_bench/method/concrete_subspace/`,
`fusion_bench/models/masks/mask_model.py`, configs `config/method/concrete_subspace/clip_concrete_*.yaml`).

One mask m, shared by every task, has an entry for every entry of every parameter. It is a Concrete (relaxed
Bernoulli) sample with learnable logits ℓ and temperature T = 0.5: for uniform noise u,

    m = sigmoid((log u − log(1 − u) + ℓ) / T),

with u clamped to [ε, 1 − ε] and m to [tiny, 1 − ε] (float32 limits), as `torch.distributions`'
`RelaxedBernoulli.rsample` computes it, except that log p − log(1 − p) is ℓ itself: torch goes through p clamped to
[ε, 1 − ε], which caps the log-odds at ±15.9, so that a mask with ℓ = +∞ would still differ from 1 where u is
small; elsewhere the two agree within 1e-6 (the parity test). Each tensor's mask is rescaled by its mean (m / mean(m)), and the merge is

    θ = θ₀ + Σ_t λ_t (m ⊙ τ_t)    (λ_t one per task, or one per task and tensor).

`concrete_ta`: λ_t = 0.3 fixed (task arithmetic); ℓ learned by minimising the summed prediction entropy on unlabeled
test batches, a new mask sampled every step. `concrete_adamerging`: meta-learning. Each step samples a mask, resets
the coefficients to 0.3, takes one inner Adam step on them (lr `base_lr` = 1, the inner optimizer keeping its
moments across steps as FusionBench's does) on the entropy with the mask held constant, then one step on ℓ on the
entropy of fresh batches through the merged model with the updated coefficients (first order: the inner step is not
differentiated through). After `steps`, the mask is fixed and AdaMerging learns the coefficients (from 0.3, Adam lr
`adamerging_lr`, `adamerging_steps` steps, unclamped). Fresh batches: FusionBench draws the inner and the outer
batch one after the other from one shuffled stream; here each step draws a batch of 2 × `batch_size` and uses its
halves, the same draw.

The final mask (`eval_mask_type`): "continuous" (FusionBench's default) is one more seeded relaxed sample,
"discrete" a Bernoulli(p) sample. Where the logits are +∞ the mask is 1 everywhere and the merge is plain task
arithmetic (or AdaMerging).

Defaults (FusionBench 0.2.33): initial logits 0, temperature 0.5, Adam lr 1e-3, batch 16 per task, λ 0.3;
`clip_concrete_task_arithmetic.yaml`: 2,000 steps; `clip_concrete_layer_wise_adamerging.yaml`: 1,000 mask steps,
base_lr 1, adamerging_lr 1e-3, 1,000 AdaMerging steps, clamp_weights false. Randomness (mask noise, data order) comes
from the run's seed. Cost: the mask logits are one more copy of the model (FusionBench's `MaskModel`), held while
training only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mergebench_core import MergeOutput, Method, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.contract.api import Batch
from mergebench_core.training.loop import TrainState
from mergebench_core.training.params import TrainingParams
from mergebench_core.training.test_time import FunctionalMerge, adapt_by_entropy, mergeable_state, summed_entropy

MASK_TYPES = ("continuous", "discrete")
SLOW = ("{steps} test-time steps (FusionBench's default) take about {seconds} s on the embedded pool; run it by name "
        "(`-m {name}`)")
GRANULARITIES = ("task", "layer")


def _clamp_probs(p: Tensor) -> Tensor:
    eps = torch.finfo(p.dtype).eps
    return p.clamp(min=eps, max=1 - eps)


def relaxed_bernoulli(logits: Tensor, uniform: Tensor, temperature: float) -> Tensor:
    """A Concrete sample given its uniform noise, computed as `RelaxedBernoulli(logits=...).rsample()` does."""
    u = _clamp_probs(uniform)
    x = (u.log() - (-u).log1p() + logits) / temperature
    info = torch.finfo(x.dtype)
    return torch.sigmoid(x).clamp(min=info.tiny, max=1 - info.eps)


@dataclass
class TaParams(TrainingParams):
    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 16
    scaling_factor: float = 0.3
    """λ of task arithmetic (every task vector's coefficient)."""
    temperature: float = 0.5
    initial_logits: float = 0.0
    """ℓ at the start (0: every entry kept with probability 1/2)."""
    eval_mask_type: str = "continuous"
    """The final mask: one more relaxed sample ("continuous") or a Bernoulli sample ("discrete")."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.eval_mask_type not in MASK_TYPES:
            raise ValueError(f"eval_mask_type must be one of {', '.join(MASK_TYPES)}, got {self.eval_mask_type!r}")


@dataclass
class AdaMergingParams(TaParams):
    steps: int = 1000
    """Meta-learning steps of the mask."""
    base_lr: float = 1.0
    """Learning rate of the inner Adam step on the coefficients."""
    adamerging_lr: float = 1e-3
    adamerging_steps: int = 1000
    """AdaMerging steps on the coefficients once the mask is fixed."""
    granularity: str = "layer"
    """One coefficient per task and parameter tensor ("layer", FusionBench's layer-wise config) or per task."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be 'task' or 'layer', got {self.granularity!r}")
        if self.adamerging_steps < 0 or not self.base_lr > 0 or not self.adamerging_lr > 0:
            raise ValueError("adamerging_steps must be >= 0 and base_lr, adamerging_lr > 0")


class ConcreteMaskedMerge(FunctionalMerge):
    """θ = θ₀ + Σ_t λ_t (m̃ ⊙ τ_t), m̃ = m / mean(m) per tensor, m a Concrete sample with logits ℓ shared by tasks."""

    def __init__(self, model: nn.Module, base: Mapping[str, Tensor], taus: Mapping[str, Tensor], init: float,
                 initial_logits: float, temperature: float, layer_wise: bool) -> None:
        super().__init__(model, list(taus))
        self.stash("base", [base[k].float() for k in self.keys])
        self.stash("tau", [taus[k] for k in self.keys])
        self.mask_logits = nn.ParameterList([nn.Parameter(torch.full_like(base[k], initial_logits, dtype=torch.float32))
                                         for k in self.keys])
        n_tasks = next(iter(taus.values())).shape[0]
        self.init = init
        self.coefficients = nn.Parameter(torch.full((n_tasks, len(self.keys) if layer_wise else 1), float(init)),
                                         requires_grad=False)
        self.layer_wise = layer_wise
        self.temperature = temperature
        self.fixed: list[Tensor] | None = None
        """The mask once it is fixed (AdaMerging's phase, the final model); None while it is sampled."""

    def sample(self, generator: torch.Generator | None, kind: str = "continuous") -> list[Tensor]:
        """One mask per tensor, each divided by its mean; noise from `generator`, drawn tensor by tensor."""
        masks = []
        for logits in self.mask_logits:
            uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
            if kind == "continuous":
                m = relaxed_bernoulli(logits, uniform, self.temperature)
            else:
                m = (uniform < torch.sigmoid(logits)).float()
            masks.append(m / m.mean())
        return masks

    def merged_with(self, masks: list[Tensor], coefficients: Tensor) -> dict[str, Tensor]:
        out = {}
        for i, (key, base, tau, m) in enumerate(zip(self.keys, self.stashed("base"), self.stashed("tau"), masks)):
            lam = coefficients[:, i if self.layer_wise else 0]
            out[key] = base + torch.einsum("t,t...->...", lam, tau) * m
        return out

    def merged(self, state: TrainState | None) -> dict[str, Tensor]:
        masks = self.fixed if self.fixed is not None else self.sample(state.generator if state else None)
        return self.merged_with(masks, self.coefficients)

    def sparsity(self) -> float:
        """Fraction of entries whose keep probability sigmoid(ℓ) exceeds 1/2."""
        kept = sum(int((lg > 0).sum()) for lg in self.mask_logits)
        return kept / max(1, sum(lg.numel() for lg in self.mask_logits))


def meta_entropy(inner_lr: float):
    """Concrete AdaMerging's outer loss: the inner coefficient step on the first half of each batch (mask held
    constant), then the entropy on the second half with the mask live and the stepped coefficients constant."""

    def loss(merge: nn.Module, batches: Mapping[str, Batch], state: TrainState) -> Tensor:
        assert isinstance(merge, ConcreteMaskedMerge)
        inner_opt = state.extras.get("inner_optimizer")
        if inner_opt is None:
            inner_opt = state.extras["inner_optimizer"] = torch.optim.Adam([merge.coefficients], lr=inner_lr)
        half = {t: (x[: len(x) // 2], y[: len(y) // 2]) for t, (x, y) in batches.items()}
        rest = {t: (x[len(x) // 2:], y[len(y) // 2:]) for t, (x, y) in batches.items()}
        masks = merge.sample(state.generator)
        with torch.no_grad():
            merge.coefficients.fill_(merge.init)
        merge.coefficients.requires_grad_(True)
        inner = merge.entropy(merge.merged_with([m.detach() for m in masks], merge.coefficients), half,
                              state.taskpool)
        (grad,) = torch.autograd.grad(inner, merge.coefficients)
        merge.coefficients.grad = grad
        inner_opt.step()
        merge.coefficients.grad = None
        merge.coefficients.requires_grad_(False)
        return merge.entropy(merge.merged_with(masks, merge.coefficients.detach()), rest, state.taskpool)

    return loss


class _Concrete(Method):
    adamerging = False

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        self.require_fit(pool)
        p = self.params
        model, base, keys, _roles = mergeable_state(pool)
        experts = [pool.state_dict(e) for e in pool.expert_names]
        taus = {k: torch.stack([e[k].float() - base[k].float() for e in experts]) for k in keys}
        layer_wise = self.adamerging and p.granularity == "layer"
        merge = ConcreteMaskedMerge(model, base, taus, p.scaling_factor, p.initial_logits, p.temperature, layer_wise)
        extras: dict[str, object] = {"steps": p.steps}
        config = p.train_config()
        if self.adamerging:
            config.batch_size = 2 * p.batch_size  # halves: the inner and the outer batch of each step
        if p.steps:
            result = adapt_by_entropy(merge, ctx, config, list(merge.mask_logits), self,
                                      loss=meta_entropy(p.base_lr) if self.adamerging else summed_entropy)
            extras.update(entropy_last=result.final_loss, train_seconds=result.seconds)
        with torch.no_grad():
            gen = ctx.generator(device=next(iter(merge.mask_logits)).device, offset=1)
            merge.fixed = [m.detach() for m in merge.sample(gen, p.eval_mask_type)]
            merge.coefficients.fill_(p.scaling_factor)
        merge.mask_logits.requires_grad_(False)
        if self.adamerging and p.adamerging_steps:
            merge.coefficients.requires_grad_(True)
            stage = TrainingParams(steps=p.adamerging_steps, lr=p.adamerging_lr, batch_size=p.batch_size)
            result = adapt_by_entropy(merge, ctx, stage.train_config(), [merge.coefficients], self)
            merge.coefficients.requires_grad_(False)
            extras.update(adamerging_entropy_last=result.final_loss, adamerging_steps=p.adamerging_steps)
        extras["kept_fraction"] = merge.sparsity()
        if self.adamerging:
            values = merge.coefficients.detach().cpu()
            extras["coefficients"] = {e: (dict(zip(merge.keys, values[i].tolist())) if layer_wise
                                          else float(values[i, 0])) for i, e in enumerate(pool.expert_names)}
        return MergeOutput(merge.materialize(), extras)


class ConcreteTaskArithmetic(_Concrete):
    """Task arithmetic (λ 0.3) through a learned shared Concrete mask over the task vectors."""

    name = "concrete_ta"
    Params = TaParams
    info = MethodInfo(kind="merge", data="unlabeled", task_vectors=True, stochastic=True,
                      left_out_of_sweeps=SLOW.format(steps="2,000", seconds=25, name="concrete_ta"))


class ConcreteAdaMerging(_Concrete):
    """A meta-learned shared Concrete mask, then AdaMerging's coefficients through it."""

    name = "concrete_adamerging"
    Params = AdaMergingParams
    info = MethodInfo(kind="merge", data="unlabeled", task_vectors=True, stochastic=True,
                      left_out_of_sweeps=SLOW.format(steps="2,000", seconds=60, name="concrete_adamerging"))
    adamerging = True


@hookimpl
def register_methods(register):
    register(ConcreteTaskArithmetic)
    register(ConcreteAdaMerging)
