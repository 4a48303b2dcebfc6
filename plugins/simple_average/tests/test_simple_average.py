import torch

from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource
from mergebench_simple_average import SimpleAverage


def test_mean_of_experts_ignores_base():
    base = StateDictSource({"w": torch.full((2,), 100.0)})
    experts = [StateDictSource({"w": torch.tensor(v)}) for v in ([1.0, 2.0], [3.0, 6.0], [2.0, 1.0])]
    out = {}
    merge_sources(SimpleAverage(), base, experts, sink=out)
    assert torch.allclose(out["w"], torch.tensor([2.0, 3.0]))


def test_runs_without_a_base():
    out = {}
    merge_sources(SimpleAverage(), None, [StateDictSource({"w": torch.ones(1)}), StateDictSource({"w": torch.zeros(1)})],
                  sink=out)
    assert torch.allclose(out["w"], torch.tensor([0.5]))
