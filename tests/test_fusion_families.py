"""The fusion family bases: align-to-first (mergebench_core.fusion.align_to_first) averages what its method aligned,
in float64, with integer buffers from the reference; level fusion (mergebench_core.fusion.level_fusion) fits every
level on the input the fused model built so far gives it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core import MergebenchError, RunContext, TaskPool
from mergebench_core.fusion.align_to_first import AlignToFirst, permuted
from mergebench_core.fusion.alignment import Level, PermutationSpec, mlp_permutation_spec
from mergebench_core.fusion.fusion_run import FusionParams
from mergebench_core.fusion.level_fusion import LevelFusion, LevelFusionParams
from mergebench_core.pools.states import StateDictPool


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.register_buffer("steps", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


SPEC = mlp_permutation_spec(["fc1", "fc2"])
LEVELS = PermutationSpec(SPEC.axes, levels=(Level("fc1"), Level("fc2")))


class Inputs(TaskPool):
    name = "inputs"

    @property
    def tasks(self) -> list[str]:
        return ["t"]

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x = torch.randn(limit or 20, 3, generator=torch.Generator().manual_seed(0))
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], torch.zeros(len(x[i:i + batch_size]), dtype=torch.long)

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)


def pool_of(values: list[float], spec: PermutationSpec = SPEC) -> StateDictPool:
    """Models whose every floating entry is `values[i]`, and whose step counter is i."""
    states = {}
    for i, v in enumerate(values):
        state = {k: torch.full_like(t, v) if t.is_floating_point() else torch.tensor(i)
                 for k, t in MLP().state_dict().items()}
        states[f"m{i}"] = state
    return StateDictPool(MLP, states, spec, name="values")


class Unmoved(AlignToFirst):
    """Aligns nothing: what comes out is the base's average of the models as they are."""

    name = "unmoved"
    Params = FusionParams

    def align(self, spec, reference, other, acts_ref, acts_other, generator):
        return other, {"moved": 0}


def test_the_aligned_models_are_averaged_in_float64_with_the_references_integers(tmp_path):
    tiny = 2.0 ** -24  # float32 would round 1 + 2^-24 back to 1 and lose both
    out = Unmoved().run(pool_of([1.0, tiny, tiny]), RunContext(cache_dir=tmp_path))
    want = torch.tensor((1.0 + 2 * tiny) / 3, dtype=torch.float64).float()
    assert want != torch.tensor(1.0 / 3.0)  # float32 accumulation would give this instead
    assert torch.equal(out.model.fc1.weight, torch.full_like(out.model.fc1.weight, want.item()))
    assert out.model.steps.item() == 0  # the reference's counter
    assert out.extras == {"reference": "m0", "alignment": {"m1": {"moved": 0}, "m2": {"moved": 0}}}


def test_a_method_may_declare_float32_averaging_and_nothing_else(tmp_path):
    class Float32(Unmoved):
        average_dtype = "float32"

    tiny = 2.0 ** -24
    out = Float32().run(pool_of([1.0, tiny, tiny]), RunContext(cache_dir=tmp_path))
    assert out.model.fc1.weight[0, 0].item() == torch.tensor(1.0 / 3.0).item()  # both tiny values lost
    with pytest.raises(TypeError, match="average_dtype is 'bfloat16'; use one of float64, float32"):
        type("Low", (Unmoved,), {"average_dtype": "bfloat16"})


def test_methods_that_read_activations_need_points_and_data(tmp_path):
    @dataclass
    class Params(FusionParams):
        how: str = "weight"

    class Reader(Unmoved):
        name = "reader"
        activation_values = {"how": ("activation",)}
        data_free_hint = "reader.how=weight"

    pool = pool_of([1.0, 2.0])
    assert Reader.unsuitable_for(pool, Params()) is None
    assert "or use reader.how=weight" in Reader.unsuitable_for(pool, Params(how="activation"))
    with pytest.raises(MergebenchError, match="reader cannot read activations: .*names no activation point"):
        Reader(Params(how="activation")).run(pool, RunContext(taskpool=Inputs(), cache_dir=tmp_path))
    with pytest.raises(MergebenchError, match="unmoved cannot fuse this pool: .*fewer than two models"):
        Unmoved().run(pool_of([1.0]), RunContext(cache_dir=tmp_path))


def test_permuted_counts_the_units_each_permutation_moved():
    state = {k: t for k, t in MLP().state_dict().items()}
    out, moved = permuted(SPEC, state, {"P_fc1": torch.tensor([0, 2, 1, 3])})
    assert moved == {"P_fc1": 2}
    assert torch.equal(out["fc1.weight"], state["fc1.weight"][[0, 2, 1, 3]])


class RecordsInputs(LevelFusion):
    """Sets every level to output ones (zero weight, bias 1) and records the input each level was given."""

    name = "records_inputs"
    Params = LevelFusionParams

    def start(self, levels, ctx):
        self.seen = {}

    def fit_level(self, step):
        self.seen[step.level.module] = (step.inputs.clone(), [a.clone() for a in step.acts])
        with torch.no_grad():
            step.module.weight.zero_()
            step.module.bias.fill_(1.0)
        return {"last": step.last, "rows": step.n_examples}


def test_each_level_is_fitted_on_the_input_of_the_fused_model_built_so_far(tmp_path):
    g = torch.Generator().manual_seed(1)
    states = {}
    for name in ("a", "b"):
        model = MLP()
        for t in model.parameters():
            t.data.copy_(torch.randn(t.shape, generator=g))
        states[name] = model.state_dict()
    pool = StateDictPool(MLP, states, LEVELS, name="levels")
    method = RecordsInputs(LevelFusionParams(num_fusion_samples=20))
    out = method.run(pool, RunContext(taskpool=Inputs(), tasks=("t",), cache_dir=tmp_path))
    x, _ = next(iter(Inputs().batches("t", "train", limit=20)))
    fc1_input, fc1_acts = method.seen["fc1"]
    torch.testing.assert_close(fc1_input, x)  # nothing is fused before the first level
    torch.testing.assert_close(fc1_acts[1], pool.load_model("b").fc1(x))  # targets come from each base model
    fc2_input, _ = method.seen["fc2"]
    assert torch.equal(fc2_input, torch.ones(20, 4))  # relu(fused fc1) = relu(0·x + 1), not the reference's input
    assert out.extras["levels"] == {"fc1": {"last": False, "rows": 20}, "fc2": {"last": True, "rows": 20}}
    assert out.extras["reference"] == "a" and out.extras["num_fusion_samples"] == 20
    with pytest.raises(MergebenchError, match="records_inputs needs unlabeled inputs of its tasks .* RunContext"):
        method.run(pool, RunContext(cache_dir=tmp_path))
    with pytest.raises(ValueError, match="importance must be one of uniform, activation"):
        LevelFusionParams(importance="deeplift")
