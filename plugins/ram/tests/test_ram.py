"""RAM and RAM+ (tensor-local) by hand and against MergeKit 0.1.5's `ram` and `ramplus_tl`."""

from __future__ import annotations

import pytest
import torch
from mergebench_ram import Params, PlusParams, Ram, RamPlus

from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource

BASE = {"w": torch.zeros(5)}
# τ1 = [2, 0, 4, 0, 1], τ2 = [0, 0, 2, 3, 1]: updated by one expert: indices 0 (τ1) and 3 (τ2); by both: 2 and 4
EXPERTS = [{"w": torch.tensor([2.0, 0.0, 4.0, 0.0, 1.0])}, {"w": torch.tensor([0.0, 0.0, 2.0, 3.0, 1.0])}]


def merge(method, base=BASE, experts=EXPERTS, block_entries=1 << 22):
    out = {}
    merge_sources(method, StateDictSource(base, "base"), [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)],
                  sink=out, block_entries=block_entries)
    return out["w"]


def test_ram_keeps_unique_updates_whole_and_averages_shared_ones():
    # [2 (τ1 alone), 0, (4+2)/2, 3 (τ2 alone), (1+1)/2]
    assert torch.allclose(merge(Ram(Params())), torch.tensor([2.0, 0.0, 3.0, 3.0, 1.0]))
    # |τ| ≤ ε does not count as an update: with ε = 1.5 the 1s vanish and index 2 has τ1 = 4 and τ2 = 2
    assert torch.allclose(merge(Ram(Params(epsilon=1.5))), torch.tensor([2.0, 0.0, 3.0, 3.0, 0.0]))


def test_ramplus_amplifies_unique_updates_by_the_overlap_ratio():
    # each expert: 2 shared updates, 1 unique → ρ = 2, clipped to α = 0.2 → λ = 1 + 0.1·0.2 = 1.02 (r = 0.1);
    # with α = 5 and r = 0.5: λ = 1 + 0.5·2 = 2
    assert torch.allclose(merge(RamPlus(PlusParams())), torch.tensor([2.04, 0.0, 3.0, 3.06, 1.0]))
    assert torch.allclose(merge(RamPlus(PlusParams(r=0.5, alpha=5.0))), torch.tensor([4.0, 0.0, 3.0, 6.0, 1.0]))


def test_ram_is_the_same_in_blocks():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(1000, generator=g)}
    experts = [{"w": base["w"] + torch.randn(1000, generator=g) * (torch.rand(1000, generator=g) < 0.3)}
               for _ in range(3)]
    assert torch.equal(merge(Ram(Params()), base, experts), merge(Ram(Params()), base, experts, block_entries=64))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_matches_mergekit_on_sparse_updates(name):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(1)
    base = torch.randn(20, 30, generator=g)
    experts = [base + 0.1 * torch.randn(20, 30, generator=g) * (torch.rand(20, 30, generator=g) < p)
               for p in (0.2, 0.5, 0.05)]
    params = {"epsilon": 1e-5} if name == "ram" else {"epsilon": 1e-5, "r": 0.3, "alpha": 0.5}
    theirs = registry.get(name)([TensorGroup.from_tensors([base, *experts], base_index=0)], parameters=params)[0]
    method = Ram(Params(**params)) if name == "ram" else RamPlus(PlusParams(**params))
    ours = merge(method, {"w": base}, [{"w": e} for e in experts])
    assert (ours - theirs).abs().max() <= 1e-5
