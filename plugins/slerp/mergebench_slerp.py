"""SLERP: spherical linear interpolation between two models, tensor by tensor (Shoemake, "Animating rotation with
quaternion curves", SIGGRAPH 1985; popularised for model merging by MergeKit).

Convention (MergeKit's `slerp`, also FusionBench's `slerp`): the *raw weights* of the two models are interpolated,
not task vectors, so no pretrained model is needed. Per tensor, with v0, v1 flattened and Ω the angle between
their directions:
  slerp(t) = sin((1 − t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1,
and where |cos Ω| > 0.9995 (nearly colinear: sin Ω ≈ 0) plain linear interpolation (1 − t)·v0 + t·v1 is used.
A tensor with norm below 1e-8 is not normalised before the angle is taken (as in MergeKit). t = 0 gives the first
model, t = 1 the second; the default t = 0.5 is the midpoint (FusionBench's default; MergeKit requires t).

The method needs exactly two experts: the pool's own two, or the two named in `models` when the pool has more
(for example `slerp.models=[digits,rot90]` on the embedded pool).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergebench_core import MergebenchError, MergeStream, MethodInfo, ModelPool, TensorMergeMethod, hookimpl


@dataclass
class Params:
    t: float = 0.5
    """Interpolation factor: 0 gives the first model, 1 the second."""
    models: list[str] | None = None
    """The two expert names to interpolate (first, second); None uses the pool's experts if it has exactly two."""
    dot_threshold: float = 0.9995
    """Above this |cos Ω| the two tensors count as colinear and are interpolated linearly."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"t must be in [0, 1] (0 gives the first model, 1 the second), got {self.t}")
        if self.models is not None and len(self.models) != 2:
            raise ValueError(f"models must name exactly two experts, got {list(self.models)}")
        if not 0.0 < self.dot_threshold <= 1.0:
            raise ValueError(f"dot_threshold must be in (0, 1], got {self.dot_threshold}")


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation between two tensors treated as flat vectors; linear when nearly colinear."""
    a, b = v0.to(torch.float64), v1.to(torch.float64)
    na, nb = a.norm(), b.norm()
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = float((ua * ub).sum())
    if abs(dot) > dot_threshold:
        return ((1 - t) * a + t * b).to(torch.float32)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s * a + math.sin(t * omega) / s * b).to(torch.float32)


class Slerp(TensorMergeMethod):
    """Interpolates two models along the great circle between each pair of tensors."""

    name = "slerp"
    Params = Params
    info = MethodInfo(kind="merge", data="none")
    requires_base = False

    def __init__(self, params: Params | None = None):
        super().__init__(params)
        self.chosen: list[str] | None = None
        """The two models' names, once `select_experts` has chosen them (stored with the result)."""

    def prepare(self, stream: MergeStream) -> None:
        if stream.num_experts != 2:
            raise MergebenchError(f"slerp interpolates exactly two models, but {stream.num_experts} were given; "
                                  f"name two with slerp.models=[first,second]")
        if self.chosen is not None:
            self.extras["models"] = list(self.chosen)

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        return slerp(self.params.t, experts[0], experts[1], self.params.dot_threshold)

    @classmethod
    def refusal(cls, pool: ModelPool, params: Params) -> str | None:
        return _wrong_choice(params.models, pool.expert_names) or super().refusal(pool, params)

    def select_experts(self, names: Sequence[str]) -> list[str]:
        """The two models to interpolate: `models` when given (names of pool experts, or of the files given to
        `mergebench merge`), else the only two there are."""
        wrong = _wrong_choice(self.params.models, names)
        if wrong:
            raise MergebenchError(wrong)
        self.chosen = list(self.params.models or names)
        return list(self.chosen)


def _wrong_choice(chosen: Sequence[str] | None, names: Sequence[str]) -> str | None:
    """Why `slerp.models` (None: all of them) do not pick two of `names`, or None when they do."""
    if chosen is None:
        if len(names) != 2:
            return (f"slerp interpolates exactly two models, but {len(names)} were given: {', '.join(names)}. "
                    f"Name two with slerp.models=[first,second]")
        return None
    unknown = [n for n in chosen if n not in names]
    if unknown:
        return (f"slerp.models names {unknown}, which are not among the models: {', '.join(names)} (the pool's "
                f"experts, or for `mergebench merge` the files' names or --task-names)")
    return None


@hookimpl
def register_methods(register):
    register(Slerp)
