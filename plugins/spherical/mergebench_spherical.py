"""Spherical merges from MergeKit 0.1.5: `nuslerp`, `multislerp` and `karcher`, tensor by tensor.

Each treats a tensor (or, for nuslerp, each row) as a vector: it interpolates the directions on the unit sphere and
the lengths linearly. All three compute in float32, as MergeKit does on float32 inputs.

- **nuslerp** (MergeKit's "NuSLERP"): SLERP between exactly two models with t = w_2 / (w_1 + w_2) from per-model
  `weights` (0.5 when they sum to ~0). With a base model (always on a pool; in a MergeKit config when `base_model` is
  given) it interpolates the two task vectors and adds the base back. `nuslerp_flatten` (default true) takes the whole
  tensor as one vector; otherwise each row along the last axis, or along the first with `nuslerp_row_wise`. Where the
  two directions are colinear (1 − cos² ≤ 1e-16) it interpolates linearly.
- **multislerp** (Goddard, "Multi-SLERP", goddard.blog): barycentric interpolation of any number of models. The unit
  directions are averaged with the weights and the mean projected to the sphere; the directions' tangent components
  there are averaged and mapped back by the exponential map; the length is the weighted mean of the lengths. With a
  base, the same on task vectors. `normalize_weights` (default true) makes the weights sum to 1.
- **karcher** (the Riemannian centre of mass on the sphere, Karcher 1977; arXiv:2603.04972 as MergeKit cites it):
  the weighted mean direction is refined by at most `max_iter` = 10 gradient steps (log map, average, exp map) until
  the step is below `tol` = 1e-5, then scaled by the mean length. It merges the models' weights (no task vectors):
  on a pool the base model is not used. Tensors of norm ≤ `tol` take no part in the direction.

Defaults are MergeKit's (weights equal, eps 1e-8, max_iter 10, tol 1e-5). `nuslerp` needs exactly two experts: on
a bigger pool name them with `nuslerp.models=[a,b]` (the grid over every method skips it there, as it does slerp).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from mergebench_core import MergebenchError, MergeStream, MethodInfo, ModelPool, TensorMergeMethod, hookimpl


def _weights(given: Sequence[float] | None, count: int, name: str) -> torch.Tensor:
    if given is None:
        return torch.ones(count, dtype=torch.float32)
    if len(given) != count:
        raise MergebenchError(f"{name}.weights has {len(given)} values for {count} models; give one per model")
    return torch.tensor([float(x) for x in given], dtype=torch.float32)


# -- nuslerp ------------------------------------------------------------------------------------------------------


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool = True, row_wise: bool = False,
            eps: float = 1e-8) -> torch.Tensor:
    """SLERP from v0 (t = 0) to v1 (t = 1) per vector: the whole tensor (`flatten`), its rows along the last axis,
    or along the first (`row_wise`); linear where the two are colinear."""
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise and v0.dim() > 1:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, out)
    if row_wise and not flatten and v0.dim() > 1:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@dataclass
class NuslerpParams:
    weights: list[float] | None = None
    """Per-model weights (w_1, w_2): t = w_2 / (w_1 + w_2); None: equal (t = 0.5)."""
    nuslerp_flatten: bool = True
    """Interpolate each tensor as one vector (false: per row)."""
    nuslerp_row_wise: bool = False
    """Without flattening: rows along the first axis (columns of a Linear weight's matrix view) instead of the last."""
    models: list[str] | None = None
    """The two experts to interpolate (first, second); None uses the pool's if it has exactly two."""

    def __post_init__(self) -> None:
        if self.weights is not None and len(self.weights) != 2:
            raise ValueError(f"nuslerp.weights must give two values (one per model), got {list(self.weights)}")
        if self.models is not None and len(self.models) != 2:
            raise ValueError(f"nuslerp.models must name exactly two experts, got {list(self.models)}")


def _wrong_choice(method: str, chosen: Sequence[str] | None, names: Sequence[str], count: int) -> str | None:
    """Why `chosen` (None: all of `names`) is not `count` of `names`, or None when it is."""
    if chosen is None:
        if len(names) != count:
            return (f"{method} merges exactly {count} models, but {len(names)} were given: {', '.join(names)}. Name "
                    f"them with {method}.models=[{','.join(['...'] * count)}]")
        return None
    unknown = [n for n in chosen if n not in names]
    if unknown:
        return f"{method}.models names {unknown}, which are not among the models: {', '.join(names)}"
    return None


class Nuslerp(TensorMergeMethod):
    """SLERP of two task vectors (or two models' weights without a base), per tensor or per row."""

    name = "nuslerp"
    Params = NuslerpParams
    info = MethodInfo(kind="merge", data="none")
    requires_base = False
    optional_base: ClassVar[bool] = True

    @classmethod
    def refusal(cls, pool: ModelPool, params: NuslerpParams) -> str | None:
        return _wrong_choice(cls.name, params.models, pool.expert_names, 2) or super().refusal(pool, params)

    def select_experts(self, names: Sequence[str]) -> list[str]:
        wrong = _wrong_choice(self.name, self.params.models, names, 2)
        if wrong:
            raise MergebenchError(wrong)
        self.chosen = list(self.params.models or names)
        return list(self.chosen)

    def prepare(self, stream: MergeStream) -> None:
        if stream.num_experts != 2:
            raise MergebenchError(f"nuslerp interpolates exactly two models, but {stream.num_experts} were given; "
                                  f"name two with nuslerp.models=[first,second]")
        if getattr(self, "chosen", None):
            self.extras["models"] = list(self.chosen)

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        w = _weights(self.params.weights, 2, self.name)
        total = float(w.sum())
        t = 0.5 if abs(total) < 1e-6 else float(w[1]) / total
        p = self.params
        v0, v1 = experts[0].to(torch.float32), experts[1].to(torch.float32)
        if base is None:
            return nuslerp(t, v0, v1, p.nuslerp_flatten, p.nuslerp_row_wise)
        b = base.to(torch.float32)
        return b + nuslerp(t, v0 - b, v1 - b, p.nuslerp_flatten, p.nuslerp_row_wise)


# -- multislerp ---------------------------------------------------------------------------------------------------


def multislerp(vectors: torch.Tensor, weights: torch.Tensor, normalize: bool = True, eps: float = 1e-8
               ) -> torch.Tensor:
    """Barycentric SLERP of the rows of `vectors` (N, n) with `weights` (N,): the interpolated vector (n,)."""
    if normalize:
        weights = weights / weights.sum()
    norms = vectors.norm(dim=-1, keepdim=True)
    units = vectors / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(vectors) == 2:  # two opposite directions: interpolate linearly
            return vectors[0] * weights[0] + vectors[1] * weights[1]
        raise MergebenchError("multislerp: the weighted mean of the directions is zero (opposite tensors with "
                              "balancing weights); change the weights")
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * weights.view(-1, 1)).sum(0)
    length = step.norm() + eps
    out = mean * torch.cos(length) + step * (torch.sin(length) / length)
    return out * (norms.squeeze(-1) * weights).sum()


@dataclass
class MultislerpParams:
    weights: list[float] | None = None
    """One weight per expert (MergeKit's per-model `weight`); None: equal."""
    normalize_weights: bool = True
    """Make the weights sum to 1."""
    eps: float = 1e-8
    """Added to norms before dividing by them."""


class Multislerp(TensorMergeMethod):
    """Barycentric spherical interpolation of every expert's task vector (or weights, without a base)."""

    name = "multislerp"
    Params = MultislerpParams
    info = MethodInfo(kind="merge", data="none")
    requires_base = False
    optional_base: ClassVar[bool] = True

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        if len(experts) == 1:
            return experts[0].to(torch.float32)
        x = torch.stack([e.to(torch.float32) for e in experts])
        b = base.to(torch.float32) if base is not None else None
        if b is not None:
            x -= b
        w = _weights(self.params.weights, len(experts), self.name)
        out = multislerp(x.reshape(len(x), -1), w, self.params.normalize_weights, self.params.eps).view(x.shape[1:])
        return out + b if b is not None else out


# -- karcher ------------------------------------------------------------------------------------------------------


def karcher_mean(tensors: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int = 10, tol: float = 1e-5
                 ) -> torch.Tensor:
    """The weighted Karcher mean direction of the flattened tensors, times Σ α_i ‖x_i‖ (float32)."""
    flat = [t.to(torch.float32).reshape(-1) for t in tensors]
    norms = [x.norm() for x in flat]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    shape = tensors[0].shape
    if not valid:
        return torch.zeros(shape, dtype=torch.float32)
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    units = [flat[i] / norms[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for ai, u in zip(a, units):
        mean += ai * u
    mean_norm = mean.norm()
    mean = units[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for ai, u in zip(a, units):
            cos = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            step += ai * (theta / torch.sin(theta)) * (u - cos * mean)
        length = step.norm()
        if float(length) < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (step / length)
        unit_norm = mean.norm()
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(ai * n for ai, n in zip(alphas, norms))
    return (scale * mean).view(shape)


@dataclass
class KarcherParams:
    max_iter: int = 10
    """At most this many refinement steps per tensor."""
    tol: float = 1e-5
    """Stop when a step is shorter than this; tensors (and angles) below it are left out."""

    def __post_init__(self) -> None:
        if self.max_iter < 0 or self.tol < 0:
            raise ValueError(f"max_iter and tol must be >= 0, got {self.max_iter} and {self.tol}")


class Karcher(TensorMergeMethod):
    """The Riemannian (Karcher) mean of the experts' weight directions on the sphere, scaled by their mean norm."""

    name = "karcher"
    Params = KarcherParams
    info = MethodInfo(kind="merge", data="none")
    requires_base = False

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        if len(experts) == 1:
            return experts[0].to(torch.float32)
        alphas = [1.0 / len(experts)] * len(experts)
        return karcher_mean(experts, alphas, self.params.max_iter, self.params.tol)


@hookimpl
def register_methods(register):
    register(Nuslerp)
    register(Multislerp)
    register(Karcher)

