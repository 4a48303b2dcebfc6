"""Passthrough copies one model (times `scale`), bit for bit, and refuses a choice it cannot make; the same as
MergeKit 0.1.5's `passthrough` function."""

from __future__ import annotations

import pytest
import torch
from mergebench_passthrough import Params, Passthrough

from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource
from mergebench_core.errors import MergebenchError


def merge(method, experts, base=None, block_entries=1 << 22):
    out = {}
    merge_sources(method, StateDictSource(base, "base") if base else None,
                  [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out, block_entries=block_entries)
    return out


def test_copies_and_scales():
    g = torch.Generator().manual_seed(0)
    model = {"w": torch.randn(40, 3, generator=g), "b": torch.randn(3, generator=g)}
    out = merge(Passthrough(Params()), [model], base={k: torch.zeros_like(v) for k, v in model.items()})
    assert all(torch.equal(out[k], model[k]) for k in model)  # the base takes no part
    out = merge(Passthrough(Params(scale=0.5)), [model], block_entries=16)
    assert all(torch.equal(out[k], model[k] * 0.5) for k in model)


def test_one_model_only():
    with pytest.raises(MergebenchError, match="passthrough.model"):
        merge(Passthrough(Params()), [{"w": torch.ones(2)}, {"w": torch.zeros(2)}])
    method = Passthrough(Params(model="e1"))
    assert method.select_experts(["e0", "e1"]) == ["e1"]
    with pytest.raises(MergebenchError, match="not among"):
        Passthrough(Params(model="x")).select_experts(["e0", "e1"])


def test_matches_mergekit():
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    x = torch.randn(7, 5)
    theirs = registry.get("passthrough")([TensorGroup.from_tensors([x])], parameters={"scale": [0.25]})[0]
    assert torch.equal(merge(Passthrough(Params(scale=0.25)), [{"w": x}])["w"], theirs)
