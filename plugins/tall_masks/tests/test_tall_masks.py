"""TALL masks and Consensus Merging against hand-computed masks, their limits (k = 0 is TA or TIES), and the
per-task models they build."""

import pytest
import torch
from torch import nn

from mergebench_core import ModelPool, PerTaskModels, RunContext
from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.errors import ConfigError
from mergebench_core.data.evaluation import evaluate
from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource
from mergebench_tall_masks import Consensus, ConsensusParams, TallMasks, TallParams
from mergebench_ties import Params as TiesParams, Ties


def merge(method, base, experts):
    out = {}
    merge_sources(method, StateDictSource(base, "base"),
                  [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out)
    return out


# τ1 = [1, 0, 2, 0], τ2 = [1, 3, -2, 0], τ3 = [0, 0, 2, 0.5];  τ_MTL = Σ τ = [2, 3, 2, 0.5];  λ_t = 0.5
# m_t = |τ_t| > 0.5·|τ_MTL − τ_t|:
#   τ1: [1 > 0.5, 0 > 1.5, 2 > 0, 0 > 0.25]    -> [1, 0, 1, 0]
#   τ2: [1 > 0.5, 3 > 0,   2 > 2 (strict: no), 0 > 0.25] -> [1, 1, 0, 0]
#   τ3: [0 > 1,   0 > 1.5, 2 > 0, 0.5 > 0]     -> [0, 0, 1, 1]
# agreeing masks per entry: [2, 1, 2, 1]
BASE = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
TAUS = [[1.0, 0.0, 2.0, 0.0], [1.0, 3.0, -2.0, 0.0], [0.0, 0.0, 2.0, 0.5]]
EXPERTS = [{"w": BASE["w"] + torch.tensor(t)} for t in TAUS]
MTL = torch.tensor([2.0, 3.0, 2.0, 0.5])


@pytest.mark.parametrize("k,keep", [(2, [1, 0, 1, 0]), (1, [1, 1, 1, 1]), (0, [1, 1, 1, 1]), (4, [0, 0, 0, 0])])
def test_consensus_keeps_entries_that_k_masks_share(k, keep):
    method = Consensus(ConsensusParams(k=k, tall_mask_lambda=0.5, scaling_factor=0.3))
    out = merge(method, BASE, EXPERTS)
    assert torch.allclose(out["w"], BASE["w"] + 0.3 * MTL * torch.tensor(keep, dtype=torch.float32))
    assert method.extras["kept_fraction"] == sum(keep) / 4


def test_consensus_with_k_zero_is_ties_when_built_on_ties():
    torch.manual_seed(0)
    base = {"a": torch.randn(20, 10), "b": torch.randn(10)}
    experts = [{k: v + torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    ours = merge(Consensus(ConsensusParams(k=0, multitask="ties", scaling_factor=0.3)), base, experts)
    ties = merge(Ties(TiesParams(k=0.2, scaling_factor=0.3)), base, experts)
    assert all(torch.allclose(ours[k], ties[k], atol=1e-6) for k in base)


def test_zero_task_vectors_return_the_base():
    out = merge(Consensus(ConsensusParams(k=0)), BASE, [BASE, BASE])
    assert torch.equal(out["w"], BASE["w"])


class VectorModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))


class ToyPool(ModelPool):
    name = "toy"

    @property
    def expert_names(self):
        return ["e1", "e2", "e3"]

    def task_of(self, expert):
        return {"e1": "one", "e2": "two", "e3": "three"}[expert]

    def load_model(self, name):
        model = VectorModel()
        weights = BASE if name == "_pretrained_" else EXPERTS[int(name[1]) - 1]
        model.load_state_dict(weights)
        return model


def test_tall_masks_build_one_model_per_task():
    out = TallMasks(TallParams(tall_mask_lambda=0.5)).run(ToyPool(), RunContext())
    assert isinstance(out.model, PerTaskModels) and TallMasks.info.task_specific
    expected = {"one": [1, 0, 1, 0], "two": [1, 1, 0, 0], "three": [0, 0, 1, 1]}
    for task, mask in expected.items():
        got = out.model.models[task].state_dict()["w"]
        assert torch.allclose(got, BASE["w"] + MTL * torch.tensor(mask, dtype=torch.float32)), task
    assert out.extras["mask_density"] == {"one": 0.5, "two": 0.5, "three": 0.5}


def test_bad_parameters_are_refused():
    with pytest.raises(ConfigError, match="multitask must be 'sum'"):
        build_params("consensus", ConsensusParams, {}, parse_overrides(["consensus.multitask=mean"]))
    with pytest.raises(ConfigError, match="k .* must be >= 0"):
        build_params("consensus", ConsensusParams, {}, parse_overrides(["consensus.k=-1"]))
    with pytest.raises(ConfigError, match="tall_mask_lambda must be non-negative"):
        build_params("tall_masks", TallParams, {}, parse_overrides(["tall_masks.tall_mask_lambda=-0.2"]))


def test_on_the_embedded_pool(digits_pools):
    pool, taskpool = digits_pools
    ctx = RunContext(taskpool=taskpool)
    tall = evaluate(taskpool, TallMasks().run(pool, ctx).model)
    consensus = evaluate(taskpool, Consensus().run(pool, ctx).model)
    pretrained = evaluate(taskpool, pool.load_model("_pretrained_"))

    def mean(metrics):
        return sum(m["accuracy"] for m in metrics.values()) / len(metrics)

    assert set(tall) == set(taskpool.tasks)
    assert mean(tall) > mean(consensus) > mean(pretrained)  # per-task models localise each task's information
