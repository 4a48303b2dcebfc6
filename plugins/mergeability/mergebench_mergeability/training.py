"""Mergeability-regularised fine-tuning: every expert of a pool re-fine-tuned with task-agnostic regularisers meant to
make it easier to merge with any partner (a derived pool).

For expert t, from the pool's pretrained weights θ₀, on task t's train split, each step minimises

    L_t(θ) + λ₂ · R2(θ) + λ₃ · R3(θ)
    R2 = ‖θ − θ₀‖²          "moderate update" (`enable_moderate_update`, `lambda_moderate_update`, default 0.01)
    R3 = ‖∇_θ L_t(θ)‖²      "gradient magnitude" (`enable_grad_magnitude`, `lambda_grad_magnitude`, default 0.001)

where L_t is the batch's cross-entropy through the task pool's frozen head, and θ every trainable parameter of the
merged model (the digits encoder; CLIP's vision tower). The parameter names and defaults are those of the
mergeability-regularisation guide this project grew from (shared/seeds/000); its motivation is a stability analysis
in which merged accuracy fell with the experts' weight and gradient distances (`mergebench mergeability --analyze`
measures that relation here).

- R2's gradient is 2λ₂(θ − θ₀), a pull back towards the pretrained weights.
- R3 is differentiated by double backward: ∇L_t is taken with `create_graph=True`, so the optimiser sees
  ∇L_t + 2λ₃·H∇L_t (H the Hessian of L_t). `grad_magnitude_every = k` computes it on steps 1, k+1, 2k+1, ... only,
  weighted by k there so its average strength stays λ₃ (lazy regularisation, as StyleGAN2 does for its R1 term);
  k = 1 computes it every step. While R3 is differentiated, attention runs through PyTorch's reference ("math")
  kernel, the one whose backward can itself be differentiated.
- A term switched on with λ = 0 is measured and logged but not added to the loss, and it leaves the training graph
  alone: the trained weights are those of plain fine-tuning (`finetune`) with the same parameters, bit for bit.

Logged every `log_every` steps (the core's loop sends them to the JSON-lines logger beside the store and to any
`--logger`), with the guide's names: `loss/train/{task}` (the task's cross-entropy, without the regularisers; the
core's `loss` is the total), `acc/train/{task}` (accuracy on the step's batch), `reg/moderate_update/{task}` =
λ₂·R2, `reg/grad_magnitude/{task}` = λ₃·R3 (on the steps that compute it, without the lazy factor k),
`reg/total/{task}` = their sum (what the regularisers add to the loss, k included), and the unweighted
`raw/moderate_update/{task}` = ‖θ − θ₀‖² and `raw/grad_magnitude/{task}` = ‖∇L_t‖². The guide's `acc/test/{task}`
is the core's periodic evaluation, `acc/val/{task}` (`eval_every`): the validation split, since the test split is
what the merge results report.

Recipes. The defaults are the embedded pool's own expert recipe (200 steps, Adam, lr 3e-4, batch 64, as
`finetune`). `Mergeability.presets["clip"]` is FusionBench's CLIP fine-tuning recipe (its `clip_finetune` method:
Adam, lr 1e-5, weight decay 0, cosine annealing over 4,000 steps; batch 32 per task), for the CLIP pools, whose
models are the vision tower (the text heads live in the task pool and stay frozen):
`mergebench mergeability --preset clip -p clip-vit-b32_TA20`, or by hand
`clip-vit-b32_TA20+mergeability(steps=4000,lr=1e-05,batch_size=32,schedule=cosine)`.

Names. The guide names checkpoints by suffix: `{task}` (no regulariser), `{task}_moderate_update`,
`{task}_grad_magnitude`, `{task}_moderate_update_grad_magnitude`. Here the suffix names the recipe, and the recipe is
the derived pool: `digits-mlp_TA8+mergeability(enable_moderate_update=true)` holds the experts the guide calls
`digits_moderate_update`, `rot90_moderate_update`, ...; inside the pool each expert keeps its task's name (so
`[task,...]` selections, per-task tables and every merge method work unchanged). `Mergeability.suffix(params)` gives
the suffix, `mergebench mergeability --recipes` takes the suffix names (`baseline` for the empty one), and its
tables label each recipe and expert with them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergebench_core import MethodInfo
from mergebench_core.training.methods import TrainingMethod
from mergebench_core.training.loop import Batch, TrainState
from mergebench_core.training.params import TrainingParams

THETA0 = "mergeability/theta0"
"""Key in `TrainState.extras` of the snapshot of θ₀ taken at the first step."""


@dataclass
class Params(TrainingParams):
    """The core's training fields (`TrainingParams`), then the loop's evaluation cadence and the two regularisers."""

    eval_every: int = 0
    """Evaluate on the validation split every N steps (logged as acc/val/{task}); 0 never does."""
    log_every: int = 1
    enable_moderate_update: bool = False
    """R2: add λ₂‖θ − θ₀‖² to the loss."""
    lambda_moderate_update: float = 0.01
    enable_grad_magnitude: bool = False
    """R3: add λ₃‖∇_θ L_task‖² to the loss (double backward)."""
    lambda_grad_magnitude: float = 0.001
    grad_magnitude_every: int = 1
    """Compute R3 every k steps only (weighted by k), when it dominates the cost of a step."""

    def __post_init__(self) -> None:
        for name in ("lambda_moderate_update", "lambda_grad_magnitude"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.grad_magnitude_every < 1:
            raise ValueError(f"grad_magnitude_every must be >= 1 (1: every step), got {self.grad_magnitude_every}")
        super().__post_init__()  # the training fields are checked now, not after the first expert


def moderate_update(params: Sequence[Tensor], theta0: Sequence[Tensor]) -> Tensor:
    """R2 = ‖θ − θ₀‖², summed over every parameter tensor (differentiable in θ)."""
    return sum(((p - p0).pow(2).sum() for p, p0 in zip(params, theta0, strict=True)),
               torch.zeros((), device=params[0].device, dtype=params[0].dtype))


def grad_magnitude(loss: Tensor, params: Sequence[Tensor], *, create_graph: bool = True) -> Tensor:
    """R3 = ‖∇_θ loss‖², summed over every parameter tensor. With `create_graph`, the result is differentiable in θ
    (double backward); without, it is a measurement that leaves `loss`'s graph usable for its own backward."""
    grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, retain_graph=True,
                                allow_unused=True)
    total = torch.zeros((), device=loss.device, dtype=torch.float32)
    for g in grads:
        if g is not None:  # summed in float32 at least (a float64 model stays in float64)
            total = total + (g.float() if g.dtype in (torch.float16, torch.bfloat16) else g).pow(2).sum()
    return total if create_graph else total.detach()


@contextlib.contextmanager
def _twice_differentiable_attention() -> Iterator[None]:
    """Attention through the reference kernel, whose backward autograd can differentiate again."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: only the plain math path differentiates twice anyway
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _task_terms(model: nn.Module, batches: Mapping[str, Batch], state: TrainState
                ) -> tuple[Tensor, dict[str, float]]:
    """The summed task losses (cross-entropy; squared error for float labels) and their per-task metrics."""
    total: Tensor | None = None
    metrics: dict[str, float] = {}
    for task, (inputs, labels) in batches.items():
        logits = state.taskpool.logits(model, task, inputs)
        if logits.dtype in (torch.float16, torch.bfloat16):  # the loss in float32 at least (float64 stays)
            logits = logits.float()
        if labels.is_floating_point():
            loss = F.mse_loss(logits.reshape(labels.shape), labels.float())
        else:
            loss = F.cross_entropy(logits, labels)
            metrics[f"acc/train/{task}"] = float((logits.detach().argmax(-1) == labels).float().mean())
        metrics[f"loss/train/{task}"] = float(loss.detach())
        total = loss if total is None else total + loss
    assert total is not None
    return total, metrics


class Mergeability(TrainingMethod):
    """Re-fine-tunes each expert with the R2 (moderate update) and R3 (gradient magnitude) regularisers, making a
    derived pool."""

    name = "mergeability"
    Params = Params
    info = MethodInfo(kind="training", data="labeled", task_vectors=True, task_specific=True)
    """Run as a cell, it scores each re-trained expert on its own task: one model per task."""
    produces = "pool"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "embedded": {},  # the defaults: the embedded pool's own expert recipe
        "clip": {"steps": 4000, "lr": 1e-5, "batch_size": 32, "optimizer": "adam", "weight_decay": 0.0,
                 "schedule": "cosine"},
    }
    """Named training recipes (`mergebench mergeability --preset NAME`): values for the training fields."""

    @staticmethod
    def suffix(params: Params) -> str:
        """The guide's checkpoint suffix of a recipe: '', '_moderate_update', '_grad_magnitude' or both."""
        return ("_moderate_update" if params.enable_moderate_update else "") + \
            ("_grad_magnitude" if params.enable_grad_magnitude else "")

    def loss(self, model: nn.Module, batches: Mapping[str, Batch], state: TrainState
             ) -> tuple[Tensor, dict[str, float]]:
        p = self.params
        params = [q for q in model.parameters() if q.requires_grad]
        if THETA0 not in state.extras:  # the first step sees the pretrained weights: keep them as θ₀
            state.extras[THETA0] = [q.detach().clone() for q in params]
        theta0 = state.extras[THETA0]
        r3_now = p.enable_grad_magnitude and (state.step - 1) % p.grad_magnitude_every == 0
        differentiate_r3 = r3_now and p.lambda_grad_magnitude > 0
        with _twice_differentiable_attention() if differentiate_r3 else contextlib.nullcontext():
            task_loss, metrics = _task_terms(model, batches, state)
            label = "+".join(batches)
            total, reg_total = task_loss, 0.0
            if p.enable_moderate_update:
                if p.lambda_moderate_update > 0:
                    r2 = moderate_update(params, theta0)
                    total = total + p.lambda_moderate_update * r2
                else:
                    with torch.no_grad():
                        r2 = moderate_update(params, theta0)
                contribution = p.lambda_moderate_update * float(r2.detach())
                metrics[f"raw/moderate_update/{label}"] = float(r2.detach())
                metrics[f"reg/moderate_update/{label}"] = contribution
                reg_total += contribution
            if r3_now:
                r3 = grad_magnitude(task_loss, params, create_graph=differentiate_r3)
                weight = p.lambda_grad_magnitude * p.grad_magnitude_every
                if differentiate_r3:
                    total = total + weight * r3
                metrics[f"raw/grad_magnitude/{label}"] = float(r3.detach())
                metrics[f"reg/grad_magnitude/{label}"] = p.lambda_grad_magnitude * float(r3.detach())
                reg_total += weight * float(r3.detach())
            metrics[f"reg/total/{label}"] = reg_total
        return total, metrics
