"""Task arithmetic and MagMax as presets of the task-vector pipeline store the same bits as their own arithmetic did
(`θ_0 + λ · Σ τ` with torch's sum of each streamed block, and `θ_0 + λ · τ_max`, the product rounded before the add),
for any number of experts and block size; and the pipeline's own rules differ from that arithmetic, which is why the
presets name theirs."""

import pytest
import torch
from mergebench_magmax import MagMax
from mergebench_magmax import Params as MagMaxParams
from mergebench_task_arithmetic import Params as TaParams
from mergebench_task_arithmetic import TaskArithmetic

from mergebench_core import MethodInfo, TaskVectorMethod
from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.pipeline import Pipeline, max_magnitude
from mergebench_core.engine.presets import PRESETS, magmax, task_arithmetic
from mergebench_core.engine.tensors import StateDictSource


class OldTaskArithmetic(TaskVectorMethod):
    """Task arithmetic as it was written before it was a preset."""
    name, info, blockwise = "old_ta", MethodInfo(), True

    def merge_task_vectors(self, key, base, taus):
        return base.to(torch.float32) + self.params * taus.sum(0)


class OldMagMax(OldTaskArithmetic):
    name = "old_magmax"

    def merge_task_vectors(self, key, base, taus):
        return base.to(torch.float32) + self.params * max_magnitude(taus)


def _merge(method, base, experts, block_entries):
    out = {}
    merge_sources(method, StateDictSource(base), [StateDictSource(e) for e in experts], sink=out,
                  block_entries=block_entries)
    return out


def _states(tasks, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"big": (300, 701), "w": (64, 33), "b": (33,), "half": (50, 40)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["half"] = base["half"].half()
    experts = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
               for _ in range(tasks)]
    return base, experts


@pytest.mark.parametrize("tasks", [2, 5, 8])
@pytest.mark.parametrize("block_entries", [1 << 22, 4096, 999])
def test_the_presets_store_the_bits_of_the_old_arithmetic(tasks, block_entries):
    base, experts = _states(tasks)
    for new, old in ((TaskArithmetic(TaParams(scaling_factor=0.3)), OldTaskArithmetic(0.3)),
                     (MagMax(MagMaxParams(scaling_factor=0.5)), OldMagMax(0.5))):
        got, want = _merge(new, base, experts, block_entries), _merge(old, base, experts, block_entries)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (new.name, key)


def test_the_pipeline_rules_differ_from_the_old_arithmetic_in_bits():
    """Why the presets declare `sum_by="torch"` and `scale_by="product"`: the pipeline's default rules (rows in task
    order, torch.add with alpha) give other last bits for eight experts, so the presets would change stored numbers."""
    base, experts = _states(8)
    want = _merge(OldTaskArithmetic(0.3), base, experts, 1 << 22)

    class Plain(TaskArithmetic):
        def pipeline(self):
            return Pipeline(scale=0.3)

    got = _merge(Plain(), base, experts, 1 << 22)
    assert not torch.equal(got["big"], want["big"])
    assert torch.allclose(got["big"], want["big"], atol=1e-5)


def test_the_presets_by_name():
    assert PRESETS["task_arithmetic"](0.3) == task_arithmetic(0.3) == Pipeline(scale=0.3, sum_by="torch",
                                                                               scale_by="product")
    assert PRESETS["magmax"](0.5) == magmax(0.5) == Pipeline(combine="max", scale=0.5, scale_by="product")
    with pytest.raises(ValueError, match="sum_by"):
        Pipeline(sum_by="pairwise")
