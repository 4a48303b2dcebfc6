"""Concrete subspace: the relaxed sample by hand (2x2), parity with FusionBench 0.2.33's `MaskModel` sampling and
`TaskWiseMergedModel` merge, +∞ logits are task arithmetic, the inner meta step's Adam move, runs on the embedded
pool."""

from __future__ import annotations

import math

import pytest
import torch
from mergebench_concrete import (
    AdaMergingParams,
    ConcreteAdaMerging,
    ConcreteMaskedMerge,
    ConcreteTaskArithmetic,
    TaParams,
    meta_entropy,
    relaxed_bernoulli,
)
from torch import nn

from mergebench_core import RunContext
from mergebench_core.contract.composition import run_base
from mergebench_core.training.loop import TrainConfig, TrainState
from mergebench_core.upscaling import entropy_loss


def test_relaxed_sample_by_hand_2x2():
    logits = torch.tensor([[0.0, 1.0], [-1.0, 2.0]])
    u = torch.tensor([[0.5, 0.25], [0.75, 0.1]])
    out = relaxed_bernoulli(logits, u, 0.5)
    # m = σ((log u − log(1−u) + ℓ) / T): logit(u) = 0, −log 3, log 3, −log 9
    by_hand = [[1 / (1 + math.exp(-(0.0 + 0.0) / 0.5)), 1 / (1 + math.exp(-(-math.log(3) + 1.0) / 0.5))],
               [1 / (1 + math.exp(-(math.log(3) - 1.0) / 0.5)), 1 / (1 + math.exp(-(-math.log(9) + 2.0) / 0.5))]]
    assert torch.allclose(out, torch.tensor(by_hand), atol=1e-6)
    assert out[0, 0] == 0.5


def test_temperature_sharpens_toward_a_bernoulli():
    logits, u = torch.zeros(1000), torch.rand(1000, generator=torch.Generator().manual_seed(0))
    cold = relaxed_bernoulli(logits, u, 1e-3)
    assert torch.equal(cold > 0.5, u > 0.5) and float(((cold - 0.5).abs() > 0.49).float().mean()) > 0.95


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def small_models(seed: int, tasks: int = 3):
    torch.manual_seed(seed)
    base = Small()
    experts = []
    for _ in range(tasks):
        e = Small()
        e.load_state_dict({k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()})
        experts.append(e)
    return base, experts


def concrete_of(base, experts, init_logits=0.0, layer_wise=False):
    state = base.state_dict()
    taus = {k: torch.stack([e.state_dict()[k] - v for e in experts]) for k, v in state.items()}
    return ConcreteMaskedMerge(Small(), state, taus, 0.3, init_logits, 0.5, layer_wise)


@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_fusion_bench_mask_sampling_and_task_wise_merge(seed):
    pytest.importorskip("fusion_bench")
    from fusion_bench.models.masks import MaskModel
    from fusion_bench.models.wrappers.task_wise_fusion import TaskWiseMergedModel

    base, experts = small_models(seed)
    ours = concrete_of(base, experts)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for lg in ours.mask_logits:
            lg.copy_(torch.randn(lg.shape, generator=g))
    mask_model = MaskModel(base, ignore_untrained_params=True, parameter_type="logits")
    for (name, theirs), lg in zip(mask_model.named_parameters(), ours.mask_logits):
        theirs.data.copy_(lg.data)
    torch.manual_seed(100 + seed)  # FusionBench samples from the global generator, tensor by tensor
    their_mask = mask_model.sample_mask(mask_type="continuous", temperature=0.5)
    our_mask = ours.sample(torch.Generator().manual_seed(100 + seed))
    for (name, m), mine in zip(their_mask.items(), our_mask):
        assert torch.allclose(m / m.mean(), mine, atol=1e-5), name
    rescaled = {k: m / m.mean() for k, m in their_mask.items()}
    fb = TaskWiseMergedModel(torch.full((3,), 0.3), small_models(seed)[0], small_models(seed)[1],
                             clamp_weights=False, tie_weights=True, strict=False)
    their_state = fb.merge_weights(task_vector_mask=rescaled)
    mine = ours.merged_with(our_mask, ours.coefficients)
    for key, value in mine.items():
        assert torch.allclose(value, their_state[key], atol=1e-5), key


def test_fusion_bench_entropy_is_ours():
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.adamerging.entropy_loss import entropy_loss as theirs

    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(entropy_loss(logits), theirs(logits), atol=1e-7)


def test_infinite_logits_are_task_arithmetic(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    ctx = RunContext(taskpool=taskpool, cache_dir=tmp_path)
    out = ConcreteTaskArithmetic(TaParams(steps=0, initial_logits=math.inf)).run(pool, ctx)
    ta = run_base("task_arithmetic", pool, ctx).model.state_dict()
    for key, value in out.model.state_dict().items():
        assert torch.allclose(value, ta[key], atol=1e-6), key
    assert out.extras["kept_fraction"] == 1.0


def test_the_inner_meta_step_is_one_adam_step_of_size_base_lr(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    from mergebench_core.training.test_time import mergeable_state

    model, base, keys, _ = mergeable_state(pool)
    experts = [pool.state_dict(e) for e in pool.expert_names]
    taus = {k: torch.stack([e[k] - base[k] for e in experts]) for k in keys}
    merge = ConcreteMaskedMerge(model, base, taus, 0.3, 0.0, 0.5, layer_wise=True)
    batches = {t: next(iter(taskpool.batches(t, "test", batch_size=32))) for t in taskpool.tasks}
    state = TrainState(1, tuple(taskpool.tasks), torch.device("cpu"), torch.Generator().manual_seed(0), taskpool,
                       TrainConfig())
    loss = meta_entropy(1.0)(merge, batches, state)
    loss.backward()
    moved = (merge.coefficients - 0.3).abs()
    assert torch.allclose(moved, torch.ones_like(moved), atol=1e-4)  # Adam's first step: lr · sign(g)
    assert all(lg.grad is not None and lg.grad.abs().sum() > 0 for lg in merge.mask_logits)
    assert merge.coefficients.grad is None  # the outer loss treats the stepped coefficients as constants


def test_runs_are_seeded_and_learn(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    ctx = RunContext(taskpool=taskpool, cache_dir=tmp_path, seed=2)
    a = ConcreteAdaMerging(AdaMergingParams(steps=3, adamerging_steps=3)).run(pool, ctx)
    b = ConcreteAdaMerging(AdaMergingParams(steps=3, adamerging_steps=3)).run(pool, ctx)
    assert a.extras["coefficients"] == b.extras["coefficients"]
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])
    c = ConcreteTaskArithmetic(TaParams(steps=5, lr=0.1)).run(pool, ctx)
    assert 0.0 < c.extras["kept_fraction"] < 1.0  # logits moved away from 0 both ways


def test_bad_parameters_say_which():
    with pytest.raises(ValueError, match="eval_mask_type"):
        TaParams(eval_mask_type="hard")
    with pytest.raises(ValueError, match="temperature"):
        TaParams(temperature=0)
    with pytest.raises(ValueError, match="granularity"):
        AdaMergingParams(granularity="tensor")
