"""SVC: parity with FusionBench 0.2.33's own calibration functions (loaded from its file when installed), closed
forms of over-counting, and the method run on top of a base method through a method spec."""

import importlib.util
from pathlib import Path

import pytest
import torch
from mergebench_svc import Params, Svc, calibrate
from torch import nn

from mergebench_core import PRETRAINED, RunContext
from mergebench_core.errors import ConfigError
from mergebench_core.pools.states import StateDictPool


def fusion_bench_svc_utils():
    """FusionBench's `singular_value_calibration/utils.py`, loaded alone (it imports only torch), or a skip."""
    spec = importlib.util.find_spec("fusion_bench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fusion-bench is not installed (pip install --no-deps fusion-bench==0.2.33)")
    path = Path(spec.submodule_search_locations[0]) / "method" / "singular_value_calibration" / "utils.py"
    if not path.exists():
        pytest.skip(f"this fusion-bench has no {path.name} for SVC")
    module_spec = importlib.util.spec_from_file_location("fusion_bench_svc_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def random_case(seed: int, tasks: int = 4, shape=(12, 9)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = base + 0.1 * torch.randn(tasks, *shape, generator=g)
    merged = base + 0.3 * (experts - base).sum(0)
    return base, experts, merged


@pytest.mark.parametrize("alpha", [0.1, 1.0, 2.0])
@pytest.mark.parametrize("shape", [(12, 9), (9, 12)])
def test_parity_with_fusion_bench(alpha, shape):
    fb = fusion_bench_svc_utils()
    base, experts, merged = random_case(0, shape=shape)
    ours = calibrate(base, experts, merged, alpha)
    fast = fb.subspace_consistency_spectral_calibration_accelerated(base, list(experts), merged, alpha=alpha,
                                                                     accelerator="cpu")
    loop = fb.subspace_consistency_spectral_calibration(base, list(experts), merged, alpha=alpha, accelerator="cpu")
    assert torch.allclose(ours, fast, atol=1e-6)
    assert torch.allclose(ours, loop, atol=1e-5)


def test_identical_tasks_summed_are_counted_once():
    # T equal task vectors summed (λ = 1): every coefficient s_r^t = T, so γ_r = T / (T·T) = 1/T and the merged
    # update T·τ becomes τ exactly (for α ≤ T)
    base, experts, _ = random_case(1, tasks=1)
    tau = experts[0] - base
    tasks = torch.stack([base + tau] * 3)
    out = calibrate(base, tasks, base + 3 * tau, alpha=0.1)
    assert torch.allclose(out, base + tau, atol=1e-6)


def test_a_large_alpha_divides_the_update_by_alpha():
    # α above every coefficient: γ_r = T / (T·α) = 1/α for every direction
    base, experts, merged = random_case(2)
    out = calibrate(base, experts, merged, alpha=1e6)
    assert torch.allclose(out, base + (merged - base) / 1e6, atol=1e-6)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(x)


class TinyPool(StateDictPool):
    relation = "finetuned"
    has_pretrained = True

    @property
    def expert_names(self):
        return [n for n in self.states if n != PRETRAINED]


def tiny_pool(seed: int = 3, tasks: int = 3) -> TinyPool:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(v.shape, generator=g) for k, v in Tiny().state_dict().items()}
    states = {PRETRAINED: base}
    for t in range(tasks):
        states[f"t{t}"] = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return TinyPool(Tiny, states, name="tiny")


def test_runs_on_top_of_its_base_and_calibrates_only_matrices():
    pool = tiny_pool()
    params = Params(base="task_arithmetic(scaling_factor=0.5)", alpha=0.1)
    out = Svc(params).run(pool, RunContext())
    base = pool.states[PRETRAINED]
    experts = torch.stack([pool.states[n]["fc.weight"] for n in pool.expert_names])
    merged = base["fc.weight"] + 0.5 * (experts - base["fc.weight"]).sum(0)
    state = out.model.state_dict()
    assert torch.allclose(state["fc.weight"], calibrate(base["fc.weight"], experts, merged, 0.1), atol=1e-6)
    bias = base["fc.bias"] + 0.5 * sum(pool.states[n]["fc.bias"] - base["fc.bias"] for n in pool.expert_names)
    assert torch.allclose(state["fc.bias"], bias, atol=1e-6)  # the base's merge, unchanged
    assert out.extras["calibrated_tensors"] == 1
    assert out.extras["base"]["spec"] == params.base


def test_the_stored_base_spells_out_every_parameter():
    assert Params().base == "task_arithmetic(scaling_factor=0.3)"
    assert Params(base="TIES(k=0.1)").base == "ties(combine=sum,k=0.1,scaling_factor=0.3,scope=global)"
    assert Params(base=Params(base="ties").base).base == Params(base="ties").base  # canonical is a fixed point


@pytest.mark.parametrize("spec,words", [
    ("tiez", ["unknown method 'tiez'", "Did you mean 'ties'"]),
    ("ties(kk=0.1)", ["no parameter 'kk'", "Did you mean 'k'"]),
    ("ties(k=2)", ["svc.base", "k must be a fraction"]),
    ("ties(k)", ["not key=value"]),
    ("ties k", ["write a method name"]),
    ("emr", ["one model per task"]),
])
def test_bad_base_specs_are_config_errors_that_say_what_and_where(spec, words):
    with pytest.raises(ConfigError) as err:
        Params(base=spec)
    for word in words:
        assert word in str(err.value)


def test_a_base_that_cannot_run_on_the_pool_is_svcs_refusal():
    pool = StateDictPool(Tiny, {"a": Tiny().state_dict(), "b": Tiny().state_dict()})  # independent: no τ
    assert "task_arithmetic" in Svc.refusal(pool, Params())
