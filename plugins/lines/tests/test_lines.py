"""LiNeS: the closed form of layer-increasing scaling on task arithmetic, the paper's α, the β search on the
validation split of the digits pool, and bad parameters."""

import pytest
import torch
from mergebench_lines import Lines, Params, layer_scales, paper_alpha
from torch import nn

from mergebench_core import PRETRAINED, RunContext
from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.data.evaluation import evaluate
from mergebench_core.engine.layers import layer_depths
from mergebench_core.errors import ConfigError
from mergebench_core.pools.states import StateDictPool
from mergebench_core.pools.views import TaskSubsetModelPool, TaskSubsetTaskPool


class Deep(nn.Module):
    """An embedding-like input map, three numbered blocks, and a final norm outside them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class TinyPool(StateDictPool):
    relation = "finetuned"
    has_pretrained = True

    @property
    def expert_names(self):
        return [n for n in self.states if n != PRETRAINED]


def tiny_pool(tasks: int = 3, seed: int = 0) -> TinyPool:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(v.shape, generator=g) for k, v in Deep().state_dict().items()}
    states = {PRETRAINED: base}
    for t in range(tasks):
        states[f"t{t}"] = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return TinyPool(Deep, states, name="tiny")


@pytest.mark.parametrize("lam,beta", [(0.3, 0.5), (1.0, 0.2)])
def test_task_arithmetic_base_has_a_closed_form(lam, beta):
    # base task arithmetic: τ_m = λ Σ τ_t, so α = ‖Στ‖₁ / (λ‖Στ‖₁) / T = 1/(λT), and
    #   θ = θ_0 + Στ/T + β · l/(L − 1) · λ Στ   in block l of L = 3 (l/(L−1) = 0, 0.5, 1),
    #   θ = θ_0 + Στ/T                          outside the blocks (stem, norm)
    pool = tiny_pool()
    out = Lines(Params(base=f"task_arithmetic(scaling_factor={lam})", beta=beta)).run(pool, RunContext())
    state = out.model.state_dict()
    base = pool.states[PRETRAINED]
    for key, theta0 in base.items():
        total = sum(pool.states[n][key] - theta0 for n in pool.expert_names)
        depth = {"blocks.0.": 0.0, "blocks.1.": 0.5, "blocks.2.": 1.0}
        fraction = next((f for prefix, f in depth.items() if key.startswith(prefix)), 0.0)
        want = theta0 + total / 3 + beta * fraction * lam * total
        assert torch.allclose(state[key], want, atol=1e-5), key
    assert out.extras["alpha"] == pytest.approx(1 / (lam * 3), rel=1e-5)
    assert out.extras["beta"] == beta and out.extras["layers"] == 3


def test_alpha_rule_and_scales():
    assert paper_alpha(6.0, 2.0, 3) == 1.0
    depths = layer_depths(["embed.weight", "layers.0.w", "layers.1.w", "layers.2.w", "final.weight"])
    assert layer_scales(depths, 0.2, 0.6) == {"embed.weight": 0.2, "layers.0.w": 0.2, "layers.1.w": 0.5,
                                              "layers.2.w": pytest.approx(0.8), "final.weight": 0.2}


def test_beta_is_the_best_of_the_grid_on_the_validation_split(digits_pools):
    pool, taskpool = digits_pools
    tasks = ["digits", "rot90"]
    pool, taskpool = TaskSubsetModelPool(pool, tasks, "sub"), TaskSubsetTaskPool(taskpool, tasks, "sub_tasks")
    out = Lines(Params(beta_points=4)).run(pool, RunContext(taskpool=taskpool))
    scores = out.extras["val_scores"]
    assert list(scores) == ["0.25", "0.5", "0.75", "1"]
    best = max(scores.values())
    assert out.extras["beta"] == min(float(b) for b, s in scores.items() if s == best)  # ties keep the smaller β
    # the reported score of the chosen β is the normalised validation accuracy of the returned model
    own = {}
    for name in pool.expert_names:
        task = pool.task_of(name)
        own[task] = evaluate(taskpool, pool.load_model(name), tasks=[task], split="val")[task]["accuracy"]
    got = evaluate(taskpool, out.model, tasks=tasks, split="val")
    normalised = sum(got[t]["accuracy"] / own[t] for t in tasks) / len(tasks)
    assert normalised == pytest.approx(scores[f"{out.extras['beta']:g}"])


@pytest.mark.parametrize("item,word", [("lines.beta=inf", "beta"), ("lines.beta_points=0", "beta_points"),
                                       ("lines.base=tiez", "Did you mean 'ties'")])
def test_bad_parameters_are_refused_with_their_name(item, word):
    with pytest.raises(ConfigError, match=word):
        build_params("lines", Params, None, parse_overrides([item]))
