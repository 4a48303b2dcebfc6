"""Surgery: the untrained adapter is the base merge exactly, one L1 step's gradients by hand, parity with FusionBench
0.2.33's `SurgeryModelWrapper` features, and runs on the embedded pool on top of a base method."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from mergebench_surgery import FeatureAdapter, Params, Surgery, SurgeryModel, features, output_feature, with_feature
from torch import nn

from mergebench_core import PerTaskModels, RunContext
from mergebench_core.data.evaluation import evaluate
from mergebench_core.errors import ConfigError


def adapter_with(width: int, hidden: int, seed: int, zero_up: bool = False) -> FeatureAdapter:
    g = torch.Generator().manual_seed(seed)
    a = FeatureAdapter(width, hidden, g)
    if not zero_up:
        with torch.no_grad():
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g))
    return a


def test_a_zero_up_projection_is_the_base_merge_exactly():
    merged = nn.Sequential(nn.Linear(5, 7), nn.Tanh())
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    model = SurgeryModel(merged, adapter_with(7, 3, seed=1, zero_up=True))
    assert torch.equal(model(x), merged(x))


def test_down_projection_init_is_nn_linears_bound_and_seeded():
    a, b = adapter_with(64, 16, seed=3, zero_up=True), adapter_with(64, 16, seed=3, zero_up=True)
    assert torch.equal(a.down.weight, b.down.weight)
    assert 0.1 < float(a.down.weight.detach().abs().max()) <= 1 / 8  # U(-1/√64, 1/√64)
    assert not a.up.weight.any()


def test_one_l1_steps_gradients_by_hand():
    g = torch.Generator().manual_seed(4)
    a = adapter_with(6, 3, seed=5)
    z, y = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    loss = F.l1_loss(a(z), y)
    loss.backward()
    D, U = a.down.weight.detach(), a.up.weight.detach()
    pre = z @ D.T                      # (N, h)
    h = pre.clamp_min(0)
    s = torch.sign(z - h @ U.T - y) / y.numel()   # d loss / d z'
    # z' = z − U h: dL/dU = −sᵀh, dL/dh = −s U, dL/dD = (dL/dh ⊙ 1[pre > 0])ᵀ z
    assert torch.allclose(a.up.weight.grad, -(s.T @ h), atol=1e-7)
    assert torch.allclose(a.down.weight.grad, ((-(s @ U)) * (pre > 0)).T @ z, atol=1e-7)


def test_hugging_face_outputs_keep_their_other_fields():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out = BaseModelOutputWithPooling(last_hidden_state=torch.ones(2, 3, 4), pooler_output=torch.zeros(2, 4))
    assert output_feature(out) is out.pooler_output
    new = with_feature(out, torch.full((2, 4), 2.0))
    assert torch.equal(new.pooler_output, torch.full((2, 4), 2.0)) and torch.equal(new[1], new.pooler_output)
    assert torch.equal(new.last_hidden_state, out.last_hidden_state)


def fusion_bench_wrapper(monkeypatch):
    pytest.importorskip("fusion_bench")
    clip = importlib.import_module("transformers.models.clip.modeling_clip")
    # the wrapper imports CLIPVisionTransformer for type hints only; recent transformers dropped the name
    monkeypatch.setattr(clip, "CLIPVisionTransformer", getattr(clip, "CLIPVisionTransformer", nn.Module),
                        raising=False)
    sys.modules.pop("fusion_bench.models.surgery.surgerymodelwrapper", None)
    return importlib.import_module("fusion_bench.models.surgery.surgerymodelwrapper")


@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_fusion_bench_surgery_features(monkeypatch, seed):
    fb = fusion_bench_wrapper(monkeypatch)
    width, tasks = 12, ["cars", "dtd"]
    wrapper = fb.SurgeryModelWrapper(nn.Identity(), tasks, projection_dim=width, hidden_dim=16)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(9, width, generator=g)
    for i, t in enumerate(tasks):
        ours = adapter_with(width, 16, seed=10 * seed + i)
        getattr(wrapper, f"feature_mapping_to_head_down_proj_{t}").weight.data.copy_(ours.down.weight)
        getattr(wrapper, f"feature_mapping_to_head_up_proj_{t}").weight.data.copy_(ours.up.weight)
        theirs, feature0, sub = wrapper.compute_surgery_features(feats, t)
        assert torch.allclose(ours(feats), theirs, atol=1e-5)
        assert torch.equal(feature0, feats)


def test_params_resolve_the_base_spec_and_check_hidden():
    assert Params().base.startswith("adamerging_lw(")
    assert Params(base="task_arithmetic").base == "task_arithmetic(scaling_factor=0.3)"
    with pytest.raises(ConfigError, match="surgery.base"):
        Params(base="tiez")
    with pytest.raises(ConfigError, match="one model per task"):
        Params(base="emr")
    with pytest.raises(ValueError, match="hidden"):
        Params(hidden=0)


def test_zero_steps_score_as_the_base_and_training_brings_features_to_the_experts(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    ctx = RunContext(taskpool=taskpool, cache_dir=tmp_path, tasks=tuple(taskpool.tasks))
    start = Surgery(Params(base="task_arithmetic", steps=0)).run(pool, ctx)
    assert isinstance(start.model, PerTaskModels) and set(start.model.models) == set(taskpool.tasks)
    from mergebench_core.contract.composition import run_base
    base = run_base("task_arithmetic", pool, ctx).model
    x, _ = next(iter(taskpool.batches("rot90", "test", batch_size=64)))
    assert torch.equal(start.model.models["rot90"](x), base(x))
    trained = Surgery(Params(base="task_arithmetic", steps=60)).run(pool, ctx)
    expert = pool.load_model(next(e for e in pool.expert_names if pool.task_of(e) == "rot90"))

    def gap(model):
        return float(F.l1_loss(features(model, taskpool, "rot90", x), features(expert, taskpool, "rot90", x)))

    assert gap(trained.model.models["rot90"]) < 0.9 * gap(start.model.models["rot90"])
    width, n0 = trained.extras["feature_width"], trained.extras["base_parameters"]
    assert trained.extras["parameters"] == n0 + len(taskpool.tasks) * 2 * 16 * width
    assert trained.extras["base"]["spec"] == "task_arithmetic(scaling_factor=0.3)"
    scores = evaluate(taskpool, trained.model, limit=200)
    assert set(scores) == set(taskpool.tasks)


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 3), nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_running_statistics_are_settled_before_training_and_recompute_is_refused():
    from mergebench_core import PRETRAINED
    from mergebench_core.errors import MergebenchError
    from mergebench_core.pools.states import StateDictPool

    states = {}
    for i, name in enumerate([PRETRAINED, "a", "b"]):
        torch.manual_seed(i)
        m = WithNorm()
        m.bn.running_mean.fill_(float(i))
        states[name] = m.state_dict()
    class FinetunedPool(StateDictPool):
        relation, has_pretrained = "finetuned", True

        @property
        def expert_names(self):
            return [n for n in self.states if n != PRETRAINED]

    pool = FinetunedPool(WithNorm, states, name="bn")
    merged = WithNorm()
    Surgery(Params(base="task_arithmetic"))._settle_running_stats(merged, pool, RunContext(bn_stats="mean"))
    assert torch.equal(merged.bn.running_mean, torch.full((3,), 1.5))  # the experts' mean of 1 and 2
    with pytest.raises(MergebenchError, match="--bn-stats mean or base"):
        Surgery(Params(base="task_arithmetic"))._settle_running_stats(merged, pool, RunContext(bn_stats="recompute"))
