"""Fisher merging: known answers on hand-built state dicts, then one run on the embedded pool."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mergebench_core import PRETRAINED, RunContext
from mergebench_core.data.evaluation import evaluate
from mergebench_fisher import FisherMerging, Params


def fisher_merge(states, fishers, **params):
    """Fisher merging of hand-built state dicts and Fishers (no pool): the merged state and the model weights w_t."""
    method = FisherMerging(Params(**params))
    extras = method.prepare(SimpleNamespace(experts=list(range(len(states)))), None, fishers)
    merged, _ = method.merge_states(states, fishers)
    return merged, list(extras["model_weights"].values())


def _states():
    g = torch.Generator().manual_seed(0)
    return [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g),
             "steps": torch.tensor(7)} for _ in range(3)]


def test_equal_fisher_is_the_simple_average():
    states = _states()
    same = {"w": torch.rand(3, 4) + 0.1, "b": torch.rand(3) + 0.1}
    for normalize in (False, True):
        merged, weights = fisher_merge(states, [same, same, same], normalize=normalize)
        assert weights == [1 / 3] * 3 or torch.allclose(torch.tensor(weights), torch.full((3,), 1 / 3))
        for k in ("w", "b"):
            torch.testing.assert_close(merged[k], torch.stack([s[k] for s in states]).mean(0))
        assert merged["steps"] == 7


def test_one_dominant_fisher_returns_that_model():
    states = _states()
    small = {"w": torch.full((3, 4), 1e-3), "b": torch.full((3,), 1e-3)}
    big = {"w": torch.full((3, 4), 1e6), "b": torch.full((3,), 1e6)}
    merged, _ = fisher_merge(states, [small, big, small], normalize=False, min_fisher=1e-6)
    for k in ("w", "b"):
        torch.testing.assert_close(merged[k], states[1][k], rtol=1e-4, atol=1e-5)


def test_hand_computed_weighted_entry():
    states = [{"w": torch.tensor([1.0, 4.0])}, {"w": torch.tensor([3.0, 0.0])}]
    fishers = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 0.0])}]
    merged, _ = fisher_merge(states, fishers, normalize=False, min_fisher=0.5)
    # entry 0: (1.5·1 + 3.5·3) / 5 = 2.4; entry 1: only the floor, so the plain average 2.0
    torch.testing.assert_close(merged["w"], torch.tensor([2.4, 2.0]))


def test_runs_on_the_embedded_pool_and_reuses_the_cache(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    ctx = RunContext(taskpool=taskpool, cache_dir=tmp_path)
    out = FisherMerging(Params(n_examples=64)).run(pool, ctx)
    assert out.extras["stats_cache"] == {"hits": 0, "misses": len(pool.expert_names)}
    assert abs(sum(out.extras["model_weights"].values()) - 1) < 1e-6
    again = FisherMerging(Params(n_examples=64, normalize=False)).run(pool, ctx)
    assert again.extras["stats_cache"] == {"hits": len(pool.expert_names), "misses": 0}

    def mean_acc(model):
        m = evaluate(taskpool, model)
        return sum(v["accuracy"] for v in m.values()) / len(m)

    assert mean_acc(out.model) > mean_acc(pool.load_model(PRETRAINED))


def test_params_are_validated():
    import pytest

    with pytest.raises(ValueError, match="labels must be one of sampled, empirical, got 'true'"):
        Params(labels="true")
    with pytest.raises(ValueError, match="min_fisher must be at least 0.0"):
        Params(min_fisher=-1)
