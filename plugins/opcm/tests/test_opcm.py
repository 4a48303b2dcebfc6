"""OPCM against a hand-computed two-step case, the closed form of its rescaling, and FusionBench 0.2.33's `OPCM`."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from mergebench_opcm import Opcm, Params, project_out, split_rank
from torch import nn

from mergebench_core.engine.roles import LINEAR, NORM


def steps(base: dict, experts: list[dict], **params) -> list[dict]:
    roles = {k: (LINEAR if v.dim() == 2 else NORM) for k, v in base.items()}
    return Opcm(Params(**params)).steps(base, experts, roles)


def test_split_rank_is_the_first_index_past_alpha():
    s = torch.tensor([4.0, 3.0, 1.0])  # cumulative shares 0.5, 0.875, 1.0
    assert [split_rank(s, a) for a in (0.4, 0.5, 0.8, 0.9, 1.0)] == [0, 1, 1, 2, 0]


def test_projection_removes_the_diagonal_and_the_leading_block():
    # merged = diag(4, 3, 1): U = V = I, so P = τ itself; alpha 0.9 protects the leading 2 × 2 block
    merged = torch.diag(torch.tensor([4.0, 3.0, 1.0]))
    tau = torch.arange(1.0, 10.0).reshape(3, 3)
    expected = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 6.0], [7.0, 8.0, 0.0]])
    torch.testing.assert_close(project_out(merged, tau, 0.9), expected)
    # alpha 0.5: r = 1, so only the diagonal goes
    torch.testing.assert_close(project_out(merged, tau, 0.5), tau - torch.diag(torch.diagonal(tau)))


def test_two_steps_by_hand():
    # Step 0: τ̂ = τ_1. Step 1 (alpha 0.5 → r = 0 on diag(3, 1)): the weight keeps τ_2 off the diagonal, the
    # bias adds τ_2 whole; S = [[3, 2], [5, 1]], b = [1, 1] + [2, -1] = [3, 0]; then S is rescaled to the mean
    # of ‖τ_1‖ = √(9 + 1 + 1 + 1) = √12 and ‖τ_2‖ = √(4 + 4 + 25 + 1 + 4 + 1) = √39.
    base = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    t1 = {"w": torch.diag(torch.tensor([3.0, 1.0])), "b": torch.tensor([1.0, 1.0])}
    t2 = {"w": torch.tensor([[2.0, 2.0], [5.0, 1.0]]), "b": torch.tensor([2.0, -1.0])}
    out = steps(base, [t1, t2])
    torch.testing.assert_close(out[0]["w"], t1["w"])
    s_w, s_b = torch.tensor([[3.0, 2.0], [5.0, 1.0]]), torch.tensor([3.0, 0.0])
    scale = (math.sqrt(12) + math.sqrt(39)) / 2 / math.sqrt(9 + 4 + 25 + 1 + 9)
    torch.testing.assert_close(out[1]["w"], s_w * scale)
    torch.testing.assert_close(out[1]["b"], s_b * scale)


def test_the_running_sum_is_kept_across_steps():
    # Three 1-D experts (nothing projected): S_t is the plain sum and θ_t = S_t · mean‖τ‖ / ‖S_t‖ at every step,
    # which needs the previous step's λ to undo its rescaling.
    g = torch.Generator().manual_seed(0)
    taus = [{"b": torch.randn(5, generator=g)} for _ in range(3)]
    out = steps({"b": torch.zeros(5)}, taus)
    for t in range(3):
        total = sum(x["b"] for x in taus[:t + 1])
        mean_norm = sum(float(x["b"].norm()) for x in taus[:t + 1]) / (t + 1)
        torch.testing.assert_close(out[t]["b"], total * mean_norm / float(total.norm()))


def _models(n_experts: int = 4):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4), nn.LayerNorm(4))
    base = make()
    experts = []
    for i in range(n_experts):
        m = make()
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        experts.append(m)
    return base, experts


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_parity_with_fusionbench(alpha):
    pytest.importorskip("fusion_bench")
    pytest.importorskip("lightning")
    from mergebench_core.engine.roles import roles_of
    from mergebench_core.testing import fusionbench_module

    base, experts = _models()
    names = [f"e{i}" for i in range(len(experts))]
    try:
        module = fusionbench_module("opcm", "opcm_general")
        pool_cls = pytest.importorskip("fusion_bench").BaseModelPool
    except ImportError as exc:  # FusionBench installed without one of its own dependencies
        pytest.skip(f"FusionBench's OPCM does not import here: {exc}")
    fb = module.OPCM(alpha=alpha, shuffle_order=False, save_on_every_step=False, evaluate_on_every_step=False)
    pool = pool_cls(models={"_pretrained_": copy.deepcopy(base),
                            **{n: copy.deepcopy(e) for n, e in zip(names, experts)}})
    reference = fb.run(pool).state_dict()
    sd0 = base.state_dict()
    ours = Opcm(Params(alpha=alpha)).steps(sd0, [e.state_dict() for e in experts], roles_of(base))[-1]
    for k, v in reference.items():
        torch.testing.assert_close(sd0[k] + ours[k], v, atol=1e-5, rtol=1e-5)


def test_params_are_validated():
    with pytest.raises(ValueError, match="alpha"):
        Params(alpha=1.5)
