"""AdaRank: the straight-through mask, every mask on reproduces each base merge, a task's components masked off by
hand, the spectra's sums, and entropy training on the embedded pool."""

from __future__ import annotations

import pytest
import torch
from mergebench_adarank import AdaRank, AdaRankModel, Params, straight_through

from mergebench_core import RunContext
from mergebench_core.contract.composition import run_base
from mergebench_core.engine.spectral import iso_cts_spectrum, task_spectrum, tsv_spectrum
from mergebench_core.upscaling import entropy_loss


def test_straight_through_is_binary_forward_and_sigmoid_backward():
    logits = torch.tensor([-3.0, -0.1, 0.1, 5.0], requires_grad=True)
    out = straight_through(logits, 10.0)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0]
    out.sum().backward()
    soft = torch.sigmoid(logits.detach() / 10.0)
    assert torch.allclose(logits.grad, soft * (1 - soft) / 10.0)


def test_spectra_compose_their_merges():
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 9, 7, generator=g)
    assert torch.allclose(task_spectrum(taus).compose(), taus.sum(0), atol=1e-5)
    assert torch.allclose(task_spectrum(taus).compose(torch.ones(21)), taus.sum(0), atol=1e-5)
    tsv = tsv_spectrum(taus)
    assert tsv.groups.tolist() == [0, 0, 1, 1, 2, 2] and torch.allclose(tsv.compose(torch.ones(6)), tsv.compose(),
                                                                        atol=1e-6)
    iso = iso_cts_spectrum(taus, 0.8)
    assert int((iso.groups == 3).sum()) == iso.rank - 3 * int((iso.groups == 0).sum())
    assert torch.allclose(iso.compose(torch.ones(iso.rank)), iso.compose(), atol=1e-6)


@pytest.mark.parametrize("base,spec", [("iso_cts", "iso_cts"), ("tsv_m", "tsv_m"),
                                       ("task_arithmetic", "task_arithmetic(scaling_factor=0.3)")])
def test_every_mask_on_is_the_base_merge(digits_pools, tmp_path, base, spec):
    pool, taskpool = digits_pools
    ctx = RunContext(taskpool=taskpool, cache_dir=tmp_path)
    out = AdaRank(Params(base=base, steps=0)).run(pool, ctx)
    reference = run_base(spec, pool, ctx).model.state_dict()
    for key, value in out.model.state_dict().items():
        assert torch.allclose(value, reference[key], atol=1e-5), key
    assert out.extras["kept_fraction"] == 1.0


def test_a_task_masked_off_leaves_the_others_task_arithmetic(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    ctx = RunContext(taskpool=taskpool, cache_dir=tmp_path)
    from mergebench_core.training.test_time import mergeable_state

    model, base, keys, roles = mergeable_state(pool)
    experts = [pool.state_dict(e) for e in pool.expert_names]
    key = "fc2.weight"
    taus = torch.stack([e[key] - base[key] for e in experts])
    from mergebench_adarank import matrix_view

    view = matrix_view(roles[key], tuple(base[key].shape))
    p = Params(base="task_arithmetic")
    merge = AdaRankModel(model, base, {key: task_spectrum(taus)}, {key: view}, {}, p, n_groups=len(experts) + 1)
    with torch.no_grad():
        merge.mask_logits[0][merge.groups0 == 2] = -1.0  # task 2's every component off
    got = merge.merged(None)[key]
    keep = [t for t in range(len(experts)) if t != 2]
    assert torch.allclose(got, base[key] + 0.3 * taus[keep].sum(0), atol=1e-5)


def _entropy(model, taskpool):
    with torch.no_grad():
        return sum(float(entropy_loss(taskpool.logits(model, t, x))) for t in taskpool.tasks
                   for x, _ in taskpool.batches(t, "test", limit=256))


def test_training_lowers_the_entropy_and_is_seeded(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    ctx = RunContext(taskpool=taskpool, cache_dir=tmp_path, seed=1)
    start = AdaRank(Params(base="tsv_m", steps=0)).run(pool, ctx)
    a = AdaRank(Params(base="tsv_m", steps=30, lr=2e-2)).run(pool, ctx)
    b = AdaRank(Params(base="tsv_m", steps=30, lr=2e-2)).run(pool, ctx)
    assert _entropy(a.model, taskpool) < _entropy(start.model, taskpool)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert a.extras["components"] == start.extras["components"]


def test_bad_parameters_say_which():
    with pytest.raises(ValueError, match="base must be one of"):
        Params(base="ties")
    with pytest.raises(ValueError, match="common_space_fraction"):
        Params(common_space_fraction=2)
    assert Params().scale == 1.5 and Params(base="tsv_m").scale == 1.0 and Params(scaling_factor=0.7).scale == 0.7
