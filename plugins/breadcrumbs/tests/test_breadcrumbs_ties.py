"""breadcrumbs_ties by hand and against MergeKit 0.1.5's `breadcrumbs_ties`."""

from __future__ import annotations

import pytest
import torch
from mergebench_breadcrumbs import BreadcrumbsTies, TiesParams

from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource


def merge(method, base, experts):
    out = {}
    merge_sources(method, StateDictSource(base, "base"), [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)],
                  sink=out)
    return out


@pytest.mark.parametrize("combine,expected", [("sum", [-1.0, -3.0, 2.0, 0.0, 0.0]),
                                              ("mean", [-1.0, -1.5, 2.0, 0.0, 0.0])])
def test_band_trim_then_sign_election(combine, expected):
    # n = 5: gamma 0.2 drops the ⌊0.2·5⌋ = 1 largest, density 0.4 keeps the next ⌊0.4·5⌋ = 2:
    #   τ1 = [5, -1, 2, 0.5, 0.1]  → drop 5, keep 2 and -1   → [0, -1, 2, 0, 0]
    #   τ2 = [-1, -2, 0.3, 6, 0.2] → drop 6, keep -2 and -1  → [-1, -2, 0, 0, 0]
    # sums [-1, -3, 2, 0, 0] → signs [-, -, +, + (zero sum), +]; agreeing entries: [-1 | -1, -2 | 2 | none | none]
    # sum [-1, -3, 2, 0, 0], mean [-1, -1.5, 2, 0, 0]; λ = 1, θ_0 = 0
    base = {"w": torch.zeros(5)}
    experts = [{"w": torch.tensor([5.0, -1.0, 2.0, 0.5, 0.1])}, {"w": torch.tensor([-1.0, -2.0, 0.3, 6.0, 0.2])}]
    out = merge(BreadcrumbsTies(TiesParams(density=0.4, gamma=0.2, scaling_factor=1.0, combine=combine)), base,
                experts)
    assert torch.allclose(out["w"], torch.tensor(expected))


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_mergekit(normalize):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 25, generator=g)
    experts = [base + 0.1 * torch.randn(12, 25, generator=g) for _ in range(3)]
    theirs = registry.get("breadcrumbs_ties")([TensorGroup.from_tensors([base, *experts], base_index=0)],
                                              parameters={"weight": 1.0, "density": 0.6, "gamma": 0.05,
                                                          "lambda": 0.8, "normalize": normalize})[0]
    ours = merge(BreadcrumbsTies(TiesParams(density=0.6, gamma=0.05, scaling_factor=0.8,
                                            combine="mean" if normalize else "sum")),
                 {"w": base}, [{"w": e} for e in experts])["w"]
    assert (ours - theirs).abs().max() <= 1e-5
