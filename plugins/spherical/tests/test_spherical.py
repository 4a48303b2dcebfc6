"""nuslerp, multislerp and karcher: closed-form answers on circles, and parity with MergeKit 0.1.5's functions."""

from __future__ import annotations

import math

import pytest
import torch
from mergebench_spherical import (
    Karcher,
    KarcherParams,
    Multislerp,
    MultislerpParams,
    Nuslerp,
    NuslerpParams,
    karcher_mean,
)

from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource
from mergebench_core.errors import MergebenchError


def merge(method, base, experts):
    out = {}
    merge_sources(method, StateDictSource(base, "base") if base is not None else None,
                  [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out)
    return out["w"]


def polar(deg, r=1.0):
    return torch.tensor([r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))])


def test_nuslerp_walks_the_arc_at_t_from_the_weights():
    # weights (3, 1): t = 1/4 of the way from 0° to 90°: 22.5°, on task vectors (the base is added back)
    base = {"w": torch.tensor([1.0, 1.0])}
    experts = [{"w": base["w"] + polar(0)}, {"w": base["w"] + polar(90)}]
    out = merge(Nuslerp(NuslerpParams(weights=[3.0, 1.0])), base, experts)
    assert torch.allclose(out, base["w"] + polar(22.5), atol=1e-6)
    # without a base: the weights themselves
    out = merge(Nuslerp(NuslerpParams()), None, [{"w": polar(0, 2.0)}, {"w": polar(60, 2.0)}])
    assert torch.allclose(out, polar(30, 2.0), atol=1e-6)


def test_nuslerp_per_row():
    # rows interpolated on their own: row 0 from 0° to 90°, row 1 from 90° to 180°, t = 0.5; flattened instead, the
    # two 4-vectors are orthogonal too, so the midpoint is (a + b)/√2
    a = torch.stack([polar(0), polar(90)])
    b = torch.stack([polar(90), polar(180)])
    out = merge(Nuslerp(NuslerpParams(nuslerp_flatten=False)), None, [{"w": a}, {"w": b}])
    assert torch.allclose(out, torch.stack([polar(45), polar(135)]), atol=1e-6)
    out = merge(Nuslerp(NuslerpParams()), None, [{"w": a}, {"w": b}])
    assert torch.allclose(out, (a + b) / math.sqrt(2), atol=1e-6)


def test_nuslerp_refuses_anything_but_two_models():
    with pytest.raises(MergebenchError, match="exactly two"):
        merge(Nuslerp(NuslerpParams()), None, [{"w": polar(0)}] * 3)


def test_karcher_mean_is_the_mean_angle_on_a_circle():
    # 0°, 0° and 90°, equal weights: the intrinsic (Karcher) mean is the mean angle, 30° (the normalised Euclidean
    # mean would be atan(1/2) = 26.57°); the length is the mean norm, (1 + 1 + 4)/3 = 2
    out = karcher_mean([polar(0), polar(0), polar(90, 4.0)], [1 / 3] * 3, max_iter=100, tol=1e-7)
    assert torch.allclose(out, polar(30, 2.0), atol=1e-5)
    out = merge(Karcher(KarcherParams(max_iter=100, tol=1e-7)), {"w": torch.zeros(2)},
                [{"w": polar(0)}, {"w": polar(0)}, {"w": polar(90, 4.0)}])  # the base takes no part
    assert torch.allclose(out, polar(30, 2.0), atol=1e-5)


def test_multislerp_of_symmetric_directions_is_their_bisector():
    # 0° and 90° with equal weights: the tangent components cancel; the result is 45° at the mean norm (1 + 3)/2
    out = merge(Multislerp(MultislerpParams()), None, [{"w": polar(0)}, {"w": polar(90, 3.0)}])
    assert torch.allclose(out, polar(45, 2.0), atol=1e-6)
    # with a base, on task vectors
    base = {"w": torch.tensor([5.0, -5.0])}
    out = merge(Multislerp(MultislerpParams()), base, [{"w": base["w"] + polar(0)}, {"w": base["w"] + polar(90, 3.0)}])
    assert torch.allclose(out, base["w"] + polar(45, 2.0), atol=1e-6)


CASES = [
    ("nuslerp", {"weight": [1.0, 2.0]}, {"weights": [1.0, 2.0]}, True, 2, (6, 9)),
    ("nuslerp", {"weight": [1.0, 2.0], "nuslerp_flatten": False}, {"weights": [1.0, 2.0], "nuslerp_flatten": False},
     False, 2, (6, 9)),
    ("nuslerp", {"weight": [2.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True},
     {"weights": [2.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True}, True, 2, (6, 9)),
    ("multislerp", {"weight": [1.0, 2.0, 0.5]}, {"weights": [1.0, 2.0, 0.5]}, True, 3, (5, 7)),
    ("multislerp", {"weight": [1.0, 2.0, 0.5]}, {"weights": [1.0, 2.0, 0.5]}, False, 3, (40,)),
    ("karcher", {}, {}, False, 4, (5, 7)),
    ("karcher", {"max_iter": 3, "tol": 1e-3}, {"max_iter": 3, "tol": 1e-3}, False, 3, (50,)),
]


@pytest.mark.parametrize("name,theirs_params,our_params,with_base,count,shape", CASES)
def test_matches_mergekit(name, theirs_params, our_params, with_base, count, shape):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    experts = [base + 0.5 * torch.randn(shape, generator=g) for _ in range(count)]
    group = TensorGroup.from_tensors([base, *experts], base_index=0) if with_base else \
        TensorGroup.from_tensors(experts)
    theirs = registry.get(name)([group], parameters=theirs_params)[0]
    cls, params = {"nuslerp": (Nuslerp, NuslerpParams), "multislerp": (Multislerp, MultislerpParams),
                   "karcher": (Karcher, KarcherParams)}[name]
    ours = merge(cls(params(**our_params)), {"w": base} if with_base else None, [{"w": e} for e in experts])
    assert (ours - theirs).abs().max() <= 1e-5
