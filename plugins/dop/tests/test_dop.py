"""DOP against hand-computed losses, gradients and MGDA weights, the closed-form minimiser of its weighted loss, and
FusionBench 0.2.33's `DOPMerging` on a small model (MGDA with EMA, the paper's configuration)."""

from __future__ import annotations

import copy

import pytest
import torch
from mergebench_dop import Adam, Dop, DualProjection, Params, dop_matrix, leading_subspace, min_norm_weight
from torch import nn


def test_leading_subspace_stops_before_the_index_that_reaches_epsilon():
    # singular values (3, 1): cumulative shares 0.75, 1.0; searchsorted(0.99999) = 1 keeps one pair
    u, s, v = leading_subspace(torch.diag(torch.tensor([3.0, 1.0])), 0.99999)
    torch.testing.assert_close(s, torch.tensor([3.0]))
    assert abs(float(u[0, 0])) == 1.0 and abs(float(v[0, 0])) == 1.0
    # a rank-one task vector reaches 1.0 at index 0, so (as in the reference) nothing is kept
    assert leading_subspace(torch.outer(torch.ones(3), torch.ones(2)), 0.99999)[1].numel() == 0


def test_losses_gradients_and_mgda_weight_by_hand():
    # merged τ̂ = diag(3, 1) keeps (e1, 3); τ = diag(1, 2) keeps (e2, 2); W = (τ̂ + τ)/2 = diag(2, 1.5).
    # L_m = 9·1 + 9·1 = 18 with D = diag(-1, 0.5), gradient 2·9·D₁₁ twice = diag(-36, 0);
    # L_t = 4·0.25 · 2 = 2 with D = diag(1, -0.5), gradient diag(0, -8).
    m, t = torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([1.0, 2.0]))
    w = (m + t) / 2
    lm, gm = DualProjection(m, 0.99999, "uv").loss_and_grad(w)
    lt, gt = DualProjection(t, 0.99999, "uv").loss_and_grad(w)
    assert (lm, lt) == pytest.approx((18.0, 2.0))
    torch.testing.assert_close(gm, torch.diag(torch.tensor([-36.0, 0.0])))
    torch.testing.assert_close(gt, torch.diag(torch.tensor([0.0, -8.0])))
    # normalised by their losses: g0 = diag(-2, 0), g1 = diag(0, -4); γ = 16 / (4 + 16) = 0.8
    assert min_norm_weight(gm / lm, gt / lt) == pytest.approx(0.8)
    # the clipped ends of the two-task rule
    assert min_norm_weight(torch.ones(2), 2 * torch.ones(2)) == 0.999
    assert min_norm_weight(2 * torch.ones(2), torch.ones(2)) == 0.001
    # one side only: u keeps the left term
    lu, _ = DualProjection(m, 0.99999, "u").loss_and_grad(w)
    assert lu == pytest.approx(9.0)


def test_fixed_weights_converge_to_the_weighted_minimiser():
    # τ̂ = diag(3, 1) keeps (e1, 3), τ = diag(2, 1) keeps (e1, 2): entry (0, 0) minimises
    # 0.8·18·(w − 3)² + 0.2·8·(w − 2)², so w = (14.4·3 + 1.6·2) / 16 = 2.9; every other entry has no gradient
    # and keeps the start (τ̂ + τ)/2.
    m, t = torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([2.0, 1.0]))
    out = dop_matrix(m, t, Params(mgda=False, alpha=0.8, lr=1e-2, num_steps=3000))
    torch.testing.assert_close(out, torch.diag(torch.tensor([2.9, 1.0])), atol=2e-3, rtol=0)


def test_zero_steps_average_and_other_tensors_are_averaged():
    g = torch.Generator().manual_seed(0)
    m, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    torch.testing.assert_close(dop_matrix(m, t, Params(num_steps=0)), (m + t) / 2)
    method = Dop(Params())
    b1, b2 = torch.randn(3, generator=g), torch.randn(3, generator=g)
    torch.testing.assert_close(method.absorb(1, "b", b1, b2, is_matrix=False), (b1 + b2) / 2)


def test_adam_is_torch_adam():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 4, generator=g)
    p = nn.Parameter(w.clone())
    opt, mine = torch.optim.Adam([p], lr=3e-3), Adam(w, 3e-3)
    for _ in range(20):
        grad = torch.randn(5, 4, generator=g)
        p.grad = grad.clone()
        opt.step()
        mine.step(grad)
    torch.testing.assert_close(w, p.detach(), atol=0, rtol=0)


def _models(n_experts: int = 3):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4), nn.LayerNorm(4))
    base, experts = make(), []
    for i in range(n_experts):
        m = make()
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        experts.append(m)
    return base, experts


@pytest.mark.parametrize("settings", [dict(mgda=True, ema=True, ema_beta=0.999), dict(mgda=True, ema=False),
                                      dict(mgda=False)], ids=["mgda-ema", "mgda", "fixed"])
def test_parity_with_fusionbench(settings):
    fusion_bench = pytest.importorskip("fusion_bench")
    pytest.importorskip("lightning")
    from mergebench_core.engine.roles import roles_of
    from mergebench_core.testing import fusionbench_module

    base, experts = _models()
    common = dict(alpha=0.8, svd_epsilon=0.99999, lr=1e-3, num_steps=30, svd_proj_space="uv")
    try:
        module = fusionbench_module("dop", "dop_general")
        pool_cls = fusion_bench.BaseModelPool
    except ImportError as exc:  # FusionBench installed without one of its own dependencies
        pytest.skip(f"FusionBench's DOP does not import here: {exc}")
    fb = module.DOPMerging(
        shuffle_order=False, save_on_every_step=False, evaluate_on_every_step=False, **common,
        **{"ema_beta": 0.999, "ema": True, **settings})
    names = [f"e{i}" for i in range(len(experts))]
    pool = pool_cls(models={"_pretrained_": copy.deepcopy(base),
                            **{n: copy.deepcopy(e) for n, e in zip(names, experts)}})
    reference = fb.run(pool).state_dict()
    sd0 = base.state_dict()
    ours = Dop(Params(**common, **settings)).steps(sd0, [e.state_dict() for e in experts], roles_of(base))[-1]
    for k, v in reference.items():
        torch.testing.assert_close(sd0[k] + ours[k], v, atol=1e-5, rtol=1e-5)


def test_params_are_validated():
    with pytest.raises(ValueError, match="svd_proj_space"):
        Params(svd_proj_space="w")
    with pytest.raises(ValueError, match="alpha"):
        Params(alpha=2.0)
