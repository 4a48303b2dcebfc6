"""EMR-Merging on a hand-computed two-task example."""

from __future__ import annotations

import pytest
import torch
from mergebench_emr import Emr, Params, elect_and_mask, emr_merge_sources

from mergebench_core.engine.tensors import StateDictSource

# τ_1 = w [2, −1, 3, 0], b [1, 1];  τ_2 = w [−1, −2, 1, 4], b [1, −3]
# Σ τ: w [1, −3, 4, 4] → γ = [+, −, +, +];  b [2, −2] → γ = [+, −]
# M_1: w [1, 1, 1, 0], b [1, 0];  M_2: w [0, 1, 1, 1], b [1, 1]
# τ_uni: w [2, −2, 3, 4] (largest agreeing magnitude per entry), b [1, −3]
# "sum":          λ_1 = (6 + 2) / (7 + 1) = 1,        λ_2 = (8 + 4) / (9 + 4) = 12/13
# "tensor_mean":  λ_1 = (6/4 + 2/2) / (7/4 + 1/2) = 10/9,  λ_2 = (8/4 + 4/2) / (9/4 + 4/2) = 16/17
BASE = {"w": torch.tensor([10.0, 20.0, 30.0, 40.0]), "b": torch.tensor([-1.0, 1.0]),
        "steps": torch.tensor([7], dtype=torch.int64)}
TAUS = [{"w": torch.tensor([2.0, -1.0, 3.0, 0.0]), "b": torch.tensor([1.0, 1.0])},
        {"w": torch.tensor([-1.0, -2.0, 1.0, 4.0]), "b": torch.tensor([1.0, -3.0])}]
MASKED_UNI = [{"w": torch.tensor([2.0, -2.0, 3.0, 0.0]), "b": torch.tensor([1.0, 0.0])},
              {"w": torch.tensor([0.0, -2.0, 3.0, 4.0]), "b": torch.tensor([1.0, -3.0])}]


def experts() -> list[StateDictSource]:
    return [StateDictSource({"w": BASE["w"] + t["w"], "b": BASE["b"] + t["b"], "steps": BASE["steps"]}, f"e{i}")
            for i, t in enumerate(TAUS)]


@pytest.mark.parametrize("rescale, lambdas", [("sum", [1.0, 12 / 13]), ("tensor_mean", [10 / 9, 16 / 17])])
def test_two_task_example(rescale, lambdas):
    result = emr_merge_sources(StateDictSource(BASE), experts(), rescale)
    assert result.rescalers == pytest.approx(lambdas, rel=1e-6)
    for t in range(2):
        sd = result.state_dicts[t]
        for key in ("w", "b"):
            torch.testing.assert_close(sd[key], BASE[key] + lambdas[t] * MASKED_UNI[t][key])
        assert torch.equal(sd["steps"], BASE["steps"])  # integer buffers are copied


def test_unified_vector_and_masks():
    uni, masks = elect_and_mask(torch.stack([TAUS[0]["w"], TAUS[1]["w"]]))
    torch.testing.assert_close(uni, torch.tensor([2.0, -2.0, 3.0, 4.0]))
    assert masks.tolist() == [[True, True, True, False], [False, True, True, True]]


def test_a_zero_sum_elects_the_positive_sign():
    # the core pipeline's one rule (the authors' code elects − here)
    uni, masks = elect_and_mask(torch.tensor([[1.0], [-1.0]]))
    assert uni.tolist() == [1.0] and masks.tolist() == [[True], [False]]


@pytest.mark.parametrize("rescale", ["sum", "tensor_mean"])
def test_blocks_give_the_same_bits_as_whole_tensors(rescale):
    from mergebench_core.engine.merging import merge_sources

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(70, 40, generator=g), "b": torch.randn(7, generator=g), "s": torch.randn((), generator=g)}
    experts = [StateDictSource({k: v + torch.randint(-2, 3, v.shape, generator=g) * 0.5 for k, v in base.items()})
               for _ in range(3)]
    whole, blocks = [{} for _ in experts], [{} for _ in experts]
    merge_sources(Emr(Params(rescale=rescale)), StateDictSource(base), experts, sink=whole)
    method = Emr(Params(rescale=rescale))
    merge_sources(method, StateDictSource(base), experts, sink=blocks, block_entries=333)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(whole, blocks) for k in base)


def test_params_are_validated():
    with pytest.raises(ValueError, match="rescale"):
        Params(rescale="max")


def test_per_task_models_on_the_digits_pool(digits_pools):
    from mergebench_core import PerTaskModels, RunContext
    from mergebench_core.data.evaluation import evaluate

    pool, taskpool = digits_pools
    out = Emr().run(pool, RunContext(taskpool=taskpool))
    assert isinstance(out.model, PerTaskModels)
    assert sorted(out.model.models) == sorted(pool.task_of(n) for n in pool.expert_names)
    assert Emr.info.task_specific
    assert all(lam > 0 for lam in out.extras["rescalers"].values())
    acc = evaluate(taskpool, out.model, limit=200)
    mean = sum(m["accuracy"] for m in acc.values()) / len(acc)
    assert mean > 0.5, acc  # ten classes per task: chance is 0.1
