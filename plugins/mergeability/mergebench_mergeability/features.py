"""The features of a group of experts that the stability analysis regresses merged accuracy on: distances, cosines
and norms of task vectors (from one Gram matrix), and the distance between the tasks' gradients at the group's
average."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mergebench_core import PRETRAINED, MergebenchError, ModelPool, TaskPool

FEATURES = ("weight_l2_distance", "gradient_l2_distance", "tau_cosine", "tau_norm")
FEATURES_VERSION = 1
"""Bump when the features' definition changes: cached features are then recomputed."""


def _source(pool: ModelPool, name: str) -> Any:
    from mergebench_core.engine.sources import StateDictSource

    tensor_source = getattr(pool, "tensor_source", None)
    return tensor_source(name) if tensor_source is not None else StateDictSource(pool.state_dict(name), name)


def task_vector_gram(pool: ModelPool, experts: Sequence[str]) -> list[list[float]]:
    """G[a][b] = ⟨τ_a, τ_b⟩ over every floating-point tensor, in float64, streaming one tensor of every model at a
    time: norms, cosines and distances of task vectors all follow from it."""
    base = _source(pool, PRETRAINED)
    sources = [_source(pool, e) for e in experts]
    gram = torch.zeros(len(experts), len(experts), dtype=torch.float64)
    for key in base.keys():  # noqa: SIM118 (a tensor source, not a dict)
        theta0 = base.get(key)
        if not theta0.is_floating_point():
            continue
        taus = torch.stack([(s.get(key).to(torch.float64) - theta0.to(torch.float64)).reshape(-1) for s in sources])
        gram += taus @ taus.T
    return gram.tolist()


def weight_features(gram: Sequence[Sequence[float]], index: Sequence[int]) -> dict[str, float]:
    """The weight-space features of a group of experts (rows of `gram`)."""
    g = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(g), 0, None))
    pairs = list(itertools.combinations(index, 2))
    dist = [math.sqrt(max(g[a, a] + g[b, b] - 2 * g[a, b], 0.0)) for a, b in pairs]
    cos = [g[a, b] / (norms[a] * norms[b]) if norms[a] * norms[b] > 0 else 0.0 for a, b in pairs]
    return {"weight_l2_distance": float(np.mean(dist)), "tau_cosine": float(np.mean(cos)),
            "tau_norm": float(np.mean([norms[i] for i in index]))}


def average_state(pool: ModelPool, members: Sequence[str]) -> dict[str, torch.Tensor]:
    """θ₀ + mean τ = the members' mean on floating-point tensors; the pretrained model's other buffers.

    Not `mergebench_core.engine.averaging.mean_state`, on purpose: this sums the members one after the other in
    float32 (a running sum, then one division), while `mean_state` stacks them and reduces with `torch.mean`, whose
    summation order differs. For three or more members the two can differ in the last bit, and the gradient distance
    taken at this point is a stored feature, so changing the order would change stored numbers. It also reads one
    member's state dict at a time instead of holding all of them."""
    base = pool.state_dict(PRETRAINED)
    sums: dict[str, torch.Tensor] = {}
    for m in members:
        for k, v in pool.state_dict(m).items():
            if base[k].is_floating_point():
                sums[k] = sums[k] + v.to(torch.float32) if k in sums else v.to(torch.float32).clone()
    return {k: (sums[k] / len(members)).to(v.dtype) if v.is_floating_point() else v for k, v in base.items()}


def task_gradients(model: torch.nn.Module, taskpool: TaskPool, tasks: Sequence[str], *, examples: int,
                   device: torch.device, batch_size: int = 256) -> dict[str, list[torch.Tensor]]:
    """∇_θ of each task's mean cross-entropy over its first `examples` train examples (the task pool's order), θ
    every parameter of `model`, in evaluation mode."""
    model.to(device).eval()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    grads = {}
    with torch.inference_mode(False), torch.enable_grad():
        for task in tasks:
            model.zero_grad(set_to_none=True)
            count = 0
            for x, y in taskpool.batches(task, "train", batch_size=batch_size, limit=examples):
                x, y = x.to(device), y.to(device)
                logits = taskpool.logits(model, task, x).float()
                F.cross_entropy(logits, y, reduction="sum").backward()
                count += len(y)
            if count == 0:
                raise MergebenchError(f"task {task!r} has no train examples to take a gradient on")
            grads[task] = [p.grad.detach().float() / count if p.grad is not None
                           else torch.zeros_like(p, dtype=torch.float32) for p in params]
    model.zero_grad(set_to_none=True)
    return grads


def gradient_distance(grads: Mapping[str, Sequence[torch.Tensor]], group: Sequence[str]) -> float:
    """Mean over unordered pairs of the group of ‖g_a − g_b‖₂."""
    out = []
    for a, b in itertools.combinations(group, 2):
        sq = sum(float((ga.double() - gb.double()).pow(2).sum()) for ga, gb in zip(grads[a], grads[b]))
        out.append(math.sqrt(sq))
    return float(np.mean(out))
