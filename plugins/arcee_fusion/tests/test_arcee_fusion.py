"""Arcee Fusion by hand (the importance, Tukey's fence) and against MergeKit 0.1.5's `arcee_fusion`."""

from __future__ import annotations

import math

import pytest
import torch
from mergebench_arcee_fusion import ArceeFusion, Params, importance, upper_fence

from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource
from mergebench_core.errors import MergebenchError


def merge(method, base, experts):
    out = {}
    merge_sources(method, StateDictSource(base, "base"), [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)],
                  sink=out)
    return out["w"]


def test_importance_is_the_update_times_the_rows_kl_divergence():
    # one row [0, 0] → [ln 3, 0]: p = (3/4, 1/4), q = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    base, expert = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert torch.allclose(importance(expert, base), torch.tensor([[math.log(3.0) * kl, 0.0]]), atol=1e-6)


def test_upper_fence_reads_quartiles_at_floor_indices():
    # 0..8: q1 = sorted[⌊0.25·8⌋] = 2, median 4, q3 6 → 4 + 1.5·4 = 10
    assert float(upper_fence(torch.arange(9.0).flip(0))) == 10.0


def test_only_outlying_updates_are_taken():
    # small random updates everywhere and one large one at [3, 0]: the large one's importance is far above Tukey's
    # fence, most others are below it; the merge takes exactly the entries at or above the fence
    base = torch.zeros(10, 4)
    g = torch.Generator().manual_seed(0)
    expert = base + 0.05 * torch.randn(10, 4, generator=g)
    expert[3, 0] = 3.0
    out = merge(ArceeFusion(Params()), {"w": base}, [{"w": expert}])
    scores = importance(expert, base)
    kept = scores >= upper_fence(scores)
    assert bool(kept[3, 0]) and int(kept.sum()) < 20
    assert torch.equal(out, torch.where(kept, expert, base))
    # a uniform update leaves every softmax unchanged: all importances are 0, the fence is 0, and all is taken
    assert torch.equal(merge(ArceeFusion(Params()), {"w": base}, [{"w": base + 0.01}]), base + 0.01)


def test_one_expert_only():
    with pytest.raises(MergebenchError, match="one"):
        merge(ArceeFusion(Params()), {"w": torch.zeros(3)}, [{"w": torch.ones(3)}, {"w": torch.ones(3)}])


@pytest.mark.parametrize("shape", [(16, 32), (300,), (4, 5, 6)])
def test_matches_mergekit(shape):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(2)
    base = torch.randn(shape, generator=g)
    expert = base + 0.2 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.5)
    theirs = registry.get("arcee_fusion")([TensorGroup.from_tensors([base, expert], base_index=0)])[0]
    ours = merge(ArceeFusion(Params()), {"w": base}, [{"w": expert}])
    assert (ours - theirs).abs().max() <= 1e-5
    assert 0 < int((ours != base).sum()) < base.numel()  # a real selection, not all or nothing
