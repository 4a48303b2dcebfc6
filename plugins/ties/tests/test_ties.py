"""TIES against hand-computed answers (worked out in the comments), including ties in magnitude and a zero task
vector."""

import pytest
import torch

from mergebench_core.errors import ConfigError
from mergebench_core.config import build_params, parse_overrides
from mergebench_core.merging import merge_sources
from mergebench_core.tensors import StateDictSource
from mergebench_ties import Params, Ties


def merge(params, base, experts):
    out = {}
    merge_sources(Ties(params), StateDictSource(base, "base"),
                  [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out.__setitem__)
    return out


BASE = {"a": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([-1.0, -1.0])}
# task vectors over the whole model (a ++ b), n = 5:
#   τ1 = [3, -1, 2 | -2, 0.5]   τ2 = [-1, 4, -2 | 1, -4]   τ3 = 0 (a zero task vector)
TAUS = [({"a": [3.0, -1.0, 2.0], "b": [-2.0, 0.5]}), ({"a": [-1.0, 4.0, -2.0], "b": [1.0, -4.0]}),
        ({"a": [0.0, 0.0, 0.0], "b": [0.0, 0.0]})]
EXPERTS = [{k: BASE[k] + torch.tensor(v) for k, v in tau.items()} for tau in TAUS]


def test_global_scope_keeps_exactly_k_n_entries_and_breaks_ties_by_position():
    # k = 0.4 keeps ⌊0.4·5⌋ = 2 entries per task over the whole model.
    # τ1: |3| first, then |2| appears at a[2] and b[0]: the earlier, a[2], wins -> [3, 0, 2 | 0, 0]
    # τ2: |4| at a[1] and b[1] -> [0, 4, 0 | 0, -4];  τ3 keeps two zeros -> 0
    # sum of trimmed = [3, 4, 2 | 0, -4]; b[0] has sum 0: tensor b's majority sign (-) is elected, nobody agrees.
    # agreeing entries: a = [3, 4, 2], b = [0, -4]; θ = θ0 + 0.3·that
    out = merge(Params(k=0.4, scaling_factor=0.3), BASE, EXPERTS)
    assert torch.allclose(out["a"], torch.tensor([1.9, 2.2, 1.6]))
    assert torch.allclose(out["b"], torch.tensor([-1.0, -2.2]))


def test_tensor_scope_ranks_within_each_tensor():
    # a: ⌊0.4·3⌋ = 1 kept per task: τ1 -> [3,0,0], τ2 -> [0,4,0], τ3 -> a zero; b: ⌊0.4·2⌋ = 0 kept.
    out = merge(Params(k=0.4, scaling_factor=0.3, scope="tensor"), BASE, EXPERTS)
    assert torch.allclose(out["a"], torch.tensor([1.9, 2.2, 1.0]))
    assert torch.allclose(out["b"], torch.tensor([-1.0, -1.0]))


@pytest.mark.parametrize("combine,expected", [("sum", [1.8, -1.5, 0.0, 1.5]), ("mean", [0.9, -0.75, 0.0, 1.5])])
def test_sign_election_and_combine(combine, expected):
    # k = 0.5 of 4 entries keeps 2 per task:
    #   τ1 = [2, -3, 1, 0] -> [2, -3, 0, 0]
    #   τ2 = [4, 1, -1, 1] -> [4, 1, 0, 0]   (|1| three times: the first, index 1, is kept)
    #   τ3 = [-1, -2, 0, 5] -> [0, -2, 0, 5]
    # sum = [6, -4, 0, 5] -> signs [+, -, (majority +), +]
    # agreeing: [2 and 4 | -3 and -2 (τ2's +1 disagrees) | none | 5]
    #   sum  -> [6, -5, 0, 5]      mean -> [3, -2.5, 0, 5];   λ = 0.3
    base = {"w": torch.zeros(4)}
    experts = [{"w": torch.tensor(v)} for v in ([2.0, -3.0, 1.0, 0.0], [4.0, 1.0, -1.0, 1.0], [-1.0, -2.0, 0.0, 5.0])]
    for scope in ("global", "tensor"):  # one tensor: both scopes agree
        out = merge(Params(k=0.5, combine=combine, scope=scope), base, experts)
        assert torch.allclose(out["w"], torch.tensor(expected))


def test_k_one_without_conflicts_is_task_arithmetic():
    base = {"w": torch.zeros(3)}
    experts = [{"w": torch.tensor([1.0, 0.0, 2.0])}, {"w": torch.tensor([0.5, 3.0, 0.0])}]
    out = merge(Params(k=1.0, scaling_factor=0.5), base, experts)
    assert torch.allclose(out["w"], 0.5 * torch.tensor([1.5, 3.0, 2.0]))


def test_all_zero_task_vectors_return_the_base():
    out = merge(Params(), BASE, [BASE, BASE])
    assert all(torch.equal(out[k], BASE[k]) for k in BASE)


def test_bad_parameters_are_reported_with_their_name():
    with pytest.raises(ConfigError, match="combine must be 'sum' or 'mean'"):
        build_params("ties", Params, {}, parse_overrides(["ties.combine=max"]))
    with pytest.raises(ConfigError, match="parameter 'k' expects float"):
        build_params("ties", Params, {}, parse_overrides(["method.k=abc"]))
