"""SCE by hand (select, calculate, erase) and against MergeKit 0.1.5's `sce`."""

from __future__ import annotations

import pytest
import torch
from mergebench_sce import Params, Sce

from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource


def merge(method, base, experts):
    out = {}
    merge_sources(method, StateDictSource(base, "base"), [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)],
                  sink=out)
    return out


def test_select_calculate_erase_by_hand():
    # τ1 = [2, 1, 0, -1], τ2 = [-2, 1, 0, 3]. Variances across the two: [4, 0, 0, 4] → 2 non-zero; select_topk 0.5
    # keeps ⌊0.5·2⌋ = 1: the first of the tied 4s, index 0 → τ1 = [2, 0, 0, 0], τ2 = [-2, 0, 0, 0].
    # weights: mean squares 1 and 1 → 0.5 each. Election at index 0: sum 0 elects +: only τ1 agrees →
    # merged[0] = 0.5·2 / 0.5 = 2; elsewhere nothing: 0.
    base = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    experts = [{"w": base["w"] + torch.tensor(t)} for t in ([2.0, 1.0, 0.0, -1.0], [-2.0, 1.0, 0.0, 3.0])]
    out = merge(Sce(Params(select_topk=0.5)), base, experts)
    assert torch.allclose(out["w"], torch.tensor([3.0, 1.0, 1.0, 1.0]))
    # select_topk 1 keeps all. weights: mean squares 6/4 and 14/4 → 0.3, 0.7. signs of sums [0→+, +, +, +]:
    # index 0: τ1 only → 2; index 1: both 1 → 1; index 2: zeros agree with nothing → 0; index 3: τ2 only → 3
    out = merge(Sce(Params(select_topk=1.0)), base, experts)
    assert torch.allclose(out["w"], base["w"] + torch.tensor([2.0, 1.0, 0.0, 3.0]))


def test_weighted_mean_where_experts_agree():
    # τ1 = [1, 1], τ2 = [3, 3]: weights 1/(1+9) and 9/10 → merged = 0.1·1 + 0.9·3 = 2.8 per entry
    base = {"w": torch.zeros(2)}
    out = merge(Sce(Params(select_topk=1.0)), base, [{"w": torch.ones(2)}, {"w": 3 * torch.ones(2)}])
    assert torch.allclose(out["w"], torch.tensor([2.8, 2.8]))


@pytest.mark.parametrize("select_topk,shape", [(1.0, (6, 11)), (0.3, (6, 11)), (0.1, (300,))])
def test_matches_mergekit(select_topk, shape):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    experts = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(4)]
    theirs = registry.get("sce")([TensorGroup.from_tensors([base, *experts], base_index=0)],
                                 parameters={"select_topk": select_topk})[0]
    ours = merge(Sce(Params(select_topk=select_topk)), {"w": base}, [{"w": e} for e in experts])["w"]
    assert (ours - theirs).abs().max() <= 1e-5


def test_select_topk_is_a_fraction():
    with pytest.raises(ValueError, match="select_topk"):
        Params(select_topk=1.5)
