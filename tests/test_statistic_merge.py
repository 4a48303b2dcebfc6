"""The statistic-merge base (mergebench_core.data.statistic_merge): its preamble and its fallback rule, on a toy
method whose statistic is a constant per expert, so every merged value is known."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from mergebench_core import PRETRAINED, MergebenchError, MethodInfo, ModelPool, RunContext, TaskPool
from mergebench_core.data.statistic_merge import StatisticMerge, StatisticParams
from mergebench_core.engine.averaging import weighted_mean

WEIGHT = {"a": 1.0, "b": 3.0}


class Toy(nn.Module):
    """A Linear layer (the statistic covers its weight), and two grouped convolutions (it cannot)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.g1 = nn.Conv2d(2, 2, 1, groups=2, bias=False)
        self.g2 = nn.Conv2d(4, 4, 1, groups=4, bias=False)
        self.register_buffer("steps", torch.tensor(0))


class ToyPool(ModelPool):
    name = "toy"

    def __init__(self, independent: bool = False):
        self.states = {}
        for i, name in enumerate([PRETRAINED, "a", "b"]):
            torch.manual_seed(i)
            model = Toy()
            model.steps.fill_(10 + i)
            self.states[name] = model.state_dict()
        if independent:
            self.relation, self.has_pretrained = "independent", False
            del self.states[PRETRAINED]

    @property
    def expert_names(self) -> list[str]:
        return ["a", "b"]

    def load_model(self, name: str) -> nn.Module:
        model = Toy()
        model.load_state_dict(self.states[name])
        return model.eval()


class NoData(TaskPool):
    name = "no-data"

    @property
    def tasks(self) -> list[str]:
        return ["a", "b"]

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(())

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)


class ConstantStatistic(StatisticMerge):
    """Each expert's statistic is WEIGHT[expert] on the Linear weight: the merge is a weighted mean there."""

    name = "constant_statistic"
    Params = StatisticParams

    def statistic(self, run, model, expert, task):
        return {"lin.weight": torch.full((2, 3), WEIGHT[expert])}

    def merge_tensor(self, key, tensors, entries, base):
        return weighted_mean(tensors, entries)

    def refused(self, model):
        return {f"{n}.weight": ("a grouped convolution", f" (groups={m.groups})") for n, m in model.named_modules()
                if isinstance(m, nn.Conv2d) and m.groups > 1}


def test_covered_tensors_follow_the_statistic_and_the_rest_is_averaged_uncounted(tmp_path):
    pool = ToyPool()
    out = ConstantStatistic().run(pool, RunContext(taskpool=NoData(), cache_dir=tmp_path))
    a, b = pool.states["a"], pool.states["b"]
    merged = out.model.state_dict()
    torch.testing.assert_close(merged["lin.weight"], (1 * a["lin.weight"] + 3 * b["lin.weight"]) / 4)
    torch.testing.assert_close(merged["lin.bias"], (a["lin.bias"] + b["lin.bias"]) / 2)  # outside the statistic
    assert merged["steps"].item() == 11  # integers: the first expert's (no base state declared)
    assert "stats_cache" not in out.extras  # the cache was never used


def test_tensors_the_statistic_cannot_handle_are_averaged_warned_once_and_counted(tmp_path, caplog):
    pool = ToyPool()
    with caplog.at_level(logging.WARNING, logger="mergebench_core.engine.roles"):
        out = ConstantStatistic().run(pool, RunContext(taskpool=NoData(), cache_dir=tmp_path))
    assert out.extras["fallback_tensors"] == {"mean": 2}  # g1 and g2; lin.bias is not a fallback
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "g1.weight is a grouped convolution (groups=2)" in warnings[0]
    for key in ("g1.weight", "g2.weight"):
        torch.testing.assert_close(out.model.state_dict()[key], (pool.states["a"][key] + pool.states["b"][key]) / 2)


def test_a_method_that_keeps_tensors_and_declares_a_base_state():
    class KeepsBias(ConstantStatistic):
        def kept(self, key):
            return key == "lin.bias"

    pool = ToyPool()
    base = pool.states[PRETRAINED]
    states = [pool.states["a"], pool.states["b"]]
    merged, covered = KeepsBias().merge_states(states, [{"lin.weight": torch.ones(2, 3)}] * 2, base=base)
    assert covered == ["lin.weight"]
    assert torch.equal(merged["lin.bias"], base["lin.bias"]) and merged["steps"].item() == 10  # from the base
    with pytest.raises(MergebenchError, match="2 experts but 1 statistics"):
        KeepsBias().merge_states(states, [{}])


def test_the_preamble_refuses_runs_without_data_or_with_the_wrong_pool(tmp_path):
    with pytest.raises(MergebenchError, match="constant_statistic needs labeled training examples .* pass a "
                                              "RunContext with a taskpool"):  # the runner's rule, `data_needs`
        ConstantStatistic().run(ToyPool(), RunContext(cache_dir=tmp_path))

    class OnTaskVectors(ConstantStatistic):
        info = MethodInfo(kind="merge", data="labeled", task_vectors=True)

    with pytest.raises(MergebenchError, match="cannot run on pool 'toy': it works on task vectors"):
        OnTaskVectors().run(ToyPool(independent=True), RunContext(taskpool=NoData(), cache_dir=tmp_path))
    with pytest.raises(ValueError, match="n_examples must be at least 1"):
        StatisticParams(n_examples=0)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        StatisticParams(batch_size=0)
