import torch
from mergebench_task_arithmetic import Params, TaskArithmetic

from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource


def test_task_arithmetic_hand_computed():
    base = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5])}
    e1 = {"w": torch.tensor([[2.0, 2.0], [3.0, 0.0]]), "b": torch.tensor([1.5])}  # τ1 = [[1,0],[0,-4]], [1]
    e2 = {"w": torch.tensor([[1.0, 4.0], [1.0, 4.0]]), "b": torch.tensor([0.5])}  # τ2 = [[0,2],[-2,0]], [0]
    out = {}
    merge_sources(TaskArithmetic(Params(scaling_factor=0.5)), StateDictSource(base),
                  [StateDictSource(e1), StateDictSource(e2)], sink=out)
    assert torch.allclose(out["w"], torch.tensor([[1.5, 3.0], [2.0, 2.0]]))
    assert torch.allclose(out["b"], torch.tensor([1.0]))


def test_default_lambda_is_fusionbench_0_3():
    assert Params().scaling_factor == 0.3
