"""Ensembles: the returned Ensemble, its weights, and the averaged logits on toy and embedded pools."""

import pytest
import torch
from torch import nn

from mergebench_core import Ensemble, MergebenchError, ModelPool, RunContext, TaskPool
from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.errors import ConfigError
from mergebench_core.data.evaluation import evaluate, task_logits
from mergebench_ensemble import SimpleEnsemble, WeightedEnsemble, WeightedParams


class ToyPool(ModelPool):
    """Two 'experts' that output constant logits: [1, 0] and [0, 1]."""

    name = "toy"

    @property
    def expert_names(self):
        return ["a", "b"]

    def load_model(self, name):
        model = nn.Linear(1, 2)
        with torch.no_grad():
            model.weight.zero_()
            model.bias.copy_(torch.tensor([1.0, 0.0] if name == "a" else [0.0, 1.0]))
        return model


class ToyTasks(TaskPool):
    name = "toy"
    tasks = ["t"]

    def batches(self, task, split="test", *, batch_size=256, limit=None):
        yield torch.zeros(4, 1), torch.tensor([1, 1, 1, 1])

    def logits(self, model, task, inputs):
        return model(inputs)


def test_equal_ensemble_averages_logits():
    out = SimpleEnsemble().run(ToyPool(), RunContext())
    assert isinstance(out.model, Ensemble) and out.model.weights is None and len(out.model.models) == 2
    logits = task_logits(ToyTasks(), out.model, "t", torch.zeros(1, 1))
    assert torch.allclose(logits, torch.tensor([[0.5, 0.5]]))


def test_weighted_ensemble_weights_the_logits():
    # weights [1, 3] -> 0.25·[1, 0] + 0.75·[0, 1] = [0.25, 0.75]: class 1 wins, as the labels say
    out = WeightedEnsemble(WeightedParams(weights=[1.0, 3.0])).run(ToyPool(), RunContext())
    assert out.extras["weights"] == [0.25, 0.75]
    assert torch.allclose(task_logits(ToyTasks(), out.model, "t", torch.zeros(1, 1)), torch.tensor([[0.25, 0.75]]))
    assert evaluate(ToyTasks(), out.model)["t"]["accuracy"] == 1.0
    flipped = WeightedEnsemble(WeightedParams(weights=[3.0, 1.0])).run(ToyPool(), RunContext())
    assert evaluate(ToyTasks(), flipped.model)["t"]["accuracy"] == 0.0


def test_bad_weights_are_refused():
    with pytest.raises(MergebenchError, match="weights has 3 entries but pool 'toy' has 2 experts"):
        WeightedEnsemble(WeightedParams(weights=[1.0, 1.0, 1.0])).run(ToyPool(), RunContext())
    with pytest.raises(ConfigError, match="non-negative"):
        build_params("weighted_ensemble", WeightedParams, {}, parse_overrides(["weighted_ensemble.weights=[1,-1]"]))
    with pytest.raises(ConfigError, match="positive sum"):
        build_params("weighted_ensemble", WeightedParams, {}, parse_overrides(["weighted_ensemble.weights=[0,0]"]))


def test_on_the_embedded_pool(digits_pools):
    pool, taskpool = digits_pools
    out = SimpleEnsemble().run(pool, RunContext(taskpool=taskpool))
    assert SimpleEnsemble.info.kind == "ensemble"
    metrics = evaluate(taskpool, out.model)
    pretrained = evaluate(taskpool, pool.load_model("_pretrained_"))
    mean = sum(m["accuracy"] for m in metrics.values()) / len(metrics)
    assert mean > sum(m["accuracy"] for m in pretrained.values()) / len(pretrained)
