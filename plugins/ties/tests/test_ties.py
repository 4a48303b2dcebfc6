"""TIES against hand-computed answers (worked out in the comments), including ties in magnitude and a zero task
vector."""

import pytest
import torch
from mergebench_ties import Params, Ties

from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.errors import ConfigError
from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource


def merge(params, base, experts, block_entries=1 << 22, method=None):
    out = {}
    merge_sources(method or Ties(params), StateDictSource(base, "base"),
                  [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out, block_entries=block_entries)
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
    # sum of trimmed = [3, 4, 2 | 0, -4]; b[0] has sum 0, which elects +: no entry there is positive, so 0.
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
    # sum = [6, -4, 0, 5] -> signs [+, -, + (a zero sum elects +), +]
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


def test_an_exact_cancellation_elects_plus():
    # k = 1: τ1 = [2, -1], τ2 = [-2, 1]: both columns sum to exactly 0, so + is elected (MergeKit's rule): the
    # positive entries are combined, [2, 1]. (The paper's code would fill in the model's majority sign.)
    base = {"w": torch.zeros(2)}
    experts = [{"w": torch.tensor([2.0, -1.0])}, {"w": torch.tensor([-2.0, 1.0])}]
    out = merge(Params(k=1.0, scaling_factor=1.0), base, experts)
    assert out["w"].tolist() == [2.0, 1.0]


def quantized_pool(seed, shapes, experts=4):
    """Task vectors on a coarse grid: many equal magnitudes at the threshold and many exact cancellations."""
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(shape, generator=g) for i, shape in enumerate(shapes)}
    pool = [{key: value + torch.randint(-4, 5, value.shape, generator=g) * 0.25 for key, value in base.items()}
            for _ in range(experts)]
    return base, pool


@pytest.mark.parametrize("combine", ["sum", "mean"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_streaming_equals_the_whole_model_reference_bit_for_bit(combine, scope):
    from mergebench_core.testing import reference_outputs
    from mergebench_ties import ties_pipeline

    # tensors large enough to be sampled (not read whole), and blocks smaller than tensors
    shapes = [(100, 60), (5000,), (7,), (50, 50), (1,), ()]
    for seed in range(3):
        base, experts = quantized_pool(seed, shapes)
        for k in (0.1, 0.37, 0.9):
            params = Params(k=k, combine=combine, scaling_factor=0.3, scope=scope)
            want = reference_outputs(ties_pipeline(params), base, experts)
            for block in (1 << 22, 1000, 333):
                got = merge(params, base, experts, block_entries=block)
                for key in base:
                    assert torch.equal(got[key], want[key]), (seed, k, key, block)


def test_a_missed_bracket_falls_back_to_the_exact_passes(monkeypatch):
    import mergebench_core.engine.threshold_search as threshold_search
    from mergebench_core.testing import reference_outputs
    from mergebench_ties import ties_pipeline

    base, experts = quantized_pool(0, [(100, 60), (5000,)])
    for scope in ("global", "tensor"):
        params = Params(k=0.2, scope=scope)
        sampled = Ties(params)
        want = merge(params, base, experts, method=sampled)
        assert "exact_fallbacks" not in sampled.extras
        # a bracket far too low: far more than k entries lie above it
        monkeypatch.setattr(threshold_search, "_bracket", lambda *a, **k: (0.0, 1e-3))
        monkeypatch.setattr(threshold_search, "_bracket_uniform",
                            lambda sample, counts, z: (torch.zeros(len(counts)), torch.full((len(counts),), 1e-3)))
        fallback = Ties(params)
        got = merge(params, base, experts, method=fallback)
        monkeypatch.undo()
        assert fallback.extras["exact_fallbacks"] >= 1
        assert all(torch.equal(got[key], want[key]) for key in base)
        reference = reference_outputs(ties_pipeline(params), base, experts)
        assert all(torch.equal(got[key], reference[key]) for key in base)
