"""AdaMerging: TIES processing by hand, and on the embedded pool the entropy goes down with coefficients in [0, 1]."""

from __future__ import annotations

import pytest
import torch

from mergebench_adamerging import (
    AdaMergingPlusPlus,
    LayerWiseAdaMerging,
    Params,
    TaskWiseAdaMerging,
    TiesParams,
    entropy,
    ties_task_vectors,
)
from mergebench_core import PRETRAINED, RunContext


def test_ties_task_vectors_by_hand():
    taus = {"a": torch.tensor([[3.0, -1.0], [-2.0, 0.5]]), "b": torch.tensor([[0.1], [4.0]])}
    out = ties_task_vectors(taus, k=2 / 3)  # keep 2 of 3 entries per task
    # task 0 keeps 3, -1; task 1 keeps -2, 4. Elected signs: a0: 3-2 > 0, a1: -1 < 0, b0: +4 > 0
    torch.testing.assert_close(out["a"], torch.tensor([[3.0, -1.0], [0.0, 0.0]]))
    torch.testing.assert_close(out["b"], torch.tensor([[0.0], [4.0]]))


def _objective(model, taskpool):
    total = 0.0
    with torch.no_grad():
        for t in taskpool.tasks:
            inputs, _ = next(iter(taskpool.batches(t, "test", batch_size=64)))
            total += float(entropy(taskpool.logits(model, t, inputs)))
    return total


def _merged(pool, coeff):
    base = pool.state_dict(PRETRAINED)
    model = pool.load_model(PRETRAINED)
    model.load_state_dict({k: v + coeff * sum(pool.state_dict(e)[k] - v for e in pool.expert_names)
                           for k, v in base.items()})
    return model


@pytest.mark.parametrize("method", [TaskWiseAdaMerging, LayerWiseAdaMerging])
def test_lowers_entropy_and_keeps_coefficients_in_range(method, digits_pools, tmp_path):
    pool, taskpool = digits_pools
    out = method(Params(steps=40, lr=1e-2)).run(pool, RunContext(taskpool=taskpool, cache_dir=tmp_path))
    coeffs = out.extras["coefficients"]
    values = [v for c in coeffs.values() for v in (c.values() if isinstance(c, dict) else [c])]
    assert len(coeffs) == len(pool.expert_names) and all(0.0 <= v <= 1.0 for v in values)
    assert any(abs(v - 0.3) > 1e-3 for v in values)  # they moved
    assert _objective(out.model, taskpool) < _objective(_merged(pool, 0.3), taskpool)


def test_plus_plus_runs_from_ties_vectors(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    out = AdaMergingPlusPlus(TiesParams(steps=5)).run(pool, RunContext(taskpool=taskpool, cache_dir=tmp_path))
    assert set(out.extras["coefficients"]) == set(pool.expert_names)
    assert TiesParams().k == 0.2 and Params().init == 0.3 and Params().lr == 1e-3


def _take(method, taskpool, seed, n):
    stream = method._inputs(RunContext(taskpool=taskpool, seed=seed), "digits")
    return [next(stream) for _ in range(n)]


def test_test_batches_are_shuffled_seeded_and_cover_the_split(digits_pools):
    """As the authors' code and FusionBench: shuffled batches, every pass a permutation of the whole test split."""
    _, taskpool = digits_pools
    inputs = torch.cat([x for x, _ in taskpool.batches("digits", "test")])
    n, bs = len(inputs), 16
    method = LayerWiseAdaMerging(Params(batch_size=bs))
    passes = -(-n // bs)
    batches = _take(method, taskpool, 0, 2 * passes)
    first, second = torch.cat(batches[:passes]), torch.cat(batches[passes:])
    for one in (first, second):  # each pass holds every test input exactly once
        assert torch.equal(torch.sort(one.sum(1)).values, torch.sort(inputs.sum(1)).values)
    assert not torch.equal(first[:bs], inputs[:bs]) and not torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(batches, _take(method, taskpool, 0, 2 * passes)))
    assert not torch.equal(batches[0], _take(method, taskpool, 1, 1)[0])


def test_a_split_larger_than_the_buffer_is_drawn_through_it(digits_pools):
    _, taskpool = digits_pools
    inputs = torch.cat([x for x, _ in taskpool.batches("digits", "test")])
    method = LayerWiseAdaMerging(Params(batch_size=16, shuffle_buffer=64))
    batches = _take(method, taskpool, 0, 60)  # 960 inputs drawn: more than the split, so the reading wraps
    seen = torch.cat(batches)
    assert all(b.shape == (16, inputs.shape[1]) for b in batches)
    assert (torch.cdist(seen, inputs).min(1).values == 0).all()  # every input drawn is a test input
    assert len(torch.unique(seen, dim=0)) > 64  # the buffer is refilled from the rest of the split
    with pytest.raises(ValueError):
        Params(batch_size=16, shuffle_buffer=8)
