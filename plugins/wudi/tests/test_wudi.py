"""WUDI against known minimisers of its interference objective."""

from __future__ import annotations

import pytest
import torch
from mergebench_wudi import Params, Wudi, interference_loss, interference_terms, wudi_matrix

from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource


def merge(base: dict, experts: list[dict], seed: int = 0, **params) -> dict:
    out: dict[str, torch.Tensor] = {}
    merge_sources(Wudi(Params(**params)), StateDictSource(base), [StateDictSource(e) for e in experts],
                  sink=out, seed=seed)
    return out


def test_orthogonal_tasks_keep_the_sum_and_vectors_are_averaged():
    # Disjoint column (input) supports: τ_s τ_tᵀ = 0 for s ≠ t, so Σ τ has zero interference and is the minimiser
    # Adam starts from and never leaves. 1-D tensors are the mean of the task vectors.
    g = torch.Generator().manual_seed(0)
    t1, t2 = torch.zeros(4, 6), torch.zeros(4, 6)
    t1[:, :3] = torch.randn(4, 3, generator=g)
    t2[:, 3:] = torch.randn(4, 3, generator=g)
    base = {"w": torch.randn(4, 6, generator=g), "b": torch.zeros(4)}
    experts = [{"w": base["w"] + t1, "b": torch.full((4,), 1.0)}, {"w": base["w"] + t2, "b": torch.full((4,), 3.0)}]
    out = merge(base, experts, steps=50, lr=1e-2)
    torch.testing.assert_close(out["w"], base["w"] + t1 + t2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["b"], torch.full((4,), 2.0))


def test_adam_converges_to_the_closed_form_minimiser():
    # L is quadratic; setting its gradient 2 Σ_t w_t (X − τ_t) τ_tᵀτ_t to zero gives X* = B A⁻¹ with
    # A = Σ w_t τ_tᵀτ_t, B = Σ w_t τ_t τ_tᵀτ_t, w_t = 1/‖τ_t‖² (A is invertible here). The tasks overlap, so X* ≠ Σ τ.
    g = torch.Generator().manual_seed(1)
    taus = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    w = 1 / taus.flatten(1).square().sum(1)
    a = sum(w[t] * taus[t].T @ taus[t] for t in range(2))
    b = sum(w[t] * taus[t] @ taus[t].T @ taus[t] for t in range(2))
    x_star = b @ torch.linalg.inv(a)
    assert (x_star - taus.sum(0)).abs().max() > 0.1
    got = wudi_matrix(taus, steps=3000, lr=1e-2)
    torch.testing.assert_close(got, x_star, atol=1e-4, rtol=0)
    assert interference_loss(got, taus) < 0.5 * interference_loss(taus.sum(0), taus)


def test_one_task_is_kept_as_is():
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(3, 5, generator=g)
    out = merge({"w": torch.zeros(3, 5)}, [{"w": tau}])
    torch.testing.assert_close(out["w"], tau)


def test_gradient_matches_autograd_of_the_papers_loss():
    g = torch.Generator().manual_seed(3)
    taus = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    interference_loss(x, taus).backward()
    a, c, _ = interference_terms(taus)
    torch.testing.assert_close(x.grad, 2 * ((x.detach() - taus.sum(0)) @ a + c))


def test_default_steps_reduce_interference_deterministically():
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.zeros(8, 8)}
    experts = [{"w": torch.randn(8, 8, generator=g) * 1e-3} for _ in range(3)]
    taus = torch.stack([e["w"] for e in experts])
    first = merge(base, experts, seed=0)["w"]
    assert interference_loss(first, taus) < interference_loss(taus.sum(0), taus)
    assert torch.equal(first, merge(base, experts, seed=0)["w"])
    assert torch.equal(first, merge(base, experts, seed=1)["w"])  # no randomness: the seed does not enter


def test_zero_task_vector_adds_no_term():
    tau = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    out = merge({"w": torch.zeros(2, 2)}, [{"w": tau}, {"w": torch.zeros(2, 2)}], steps=20, lr=1e-2)
    torch.testing.assert_close(out["w"], tau)
    assert torch.isfinite(out["w"]).all()


def test_params_are_validated():
    with pytest.raises(ValueError, match="steps"):
        Params(steps=-1)
    with pytest.raises(ValueError, match="lr"):
        Params(lr=0.0)


def test_runs_on_the_digits_pool(digits_pools):
    # WUDI adds the un-scaled optimised update (it starts from Σ τ, i.e. task arithmetic with λ = 1, and lr 1e-5
    # moves it little on this small pool), so accuracy is only checked against chance; what must hold on real task
    # vectors is that every 2-D weight's interference went down.
    from mergebench_core import PRETRAINED, RunContext
    from mergebench_core.data.evaluation import evaluate

    pool, taskpool = digits_pools
    out = Wudi(Params(steps=50)).run(pool, RunContext(taskpool=taskpool))
    base = pool.state_dict(PRETRAINED)
    experts = [pool.state_dict(n) for n in pool.expert_names]
    merged = out.model.state_dict()
    for key, value in base.items():
        if value.dim() == 2:
            taus = torch.stack([e[key] - value for e in experts])
            assert interference_loss(merged[key] - value, taus) < interference_loss(taus.sum(0), taus), key
    acc = evaluate(taskpool, out.model, limit=200)
    assert sum(m["accuracy"] for m in acc.values()) / len(acc) > 0.2, acc  # ten classes per task: chance is 0.1


def test_a_conv_kernel_is_merged_on_its_matrix_view():
    # WUDI's interference is measured on rows of the layer's matrix: for a kernel (out, in, kh, kw) those are the
    # rows of out × (in·kh·kw), the vectors that multiply unfolded patches. The 1-D bias stays the mean.
    from mergebench_core.engine.roles import roles_of

    g = torch.Generator().manual_seed(5)
    conv = torch.nn.Conv2d(3, 4, 3)
    base = {k: torch.randn(v.shape, generator=g) for k, v in conv.state_dict().items()}
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    taus = torch.stack([e["weight"] - base["weight"] for e in experts])
    out: dict[str, torch.Tensor] = {}
    merge_sources(Wudi(Params(steps=20, lr=1e-2)), StateDictSource(base), [StateDictSource(e) for e in experts],
                  sink=out, roles=roles_of(conv))
    want = base["weight"] + wudi_matrix(taus.reshape(2, 4, 27), 20, 1e-2).reshape(taus.shape[1:])
    torch.testing.assert_close(out["weight"], want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out["weight"], base["weight"] + taus.mean(0))
    torch.testing.assert_close(out["bias"], base["bias"] + taus.new_tensor(0) + torch.stack(
        [e["bias"] - base["bias"] for e in experts]).mean(0))


def test_relative_lr_makes_the_merge_scale_equivariant():
    # L(c·τ_m; c·τ) = c²·L(τ_m; τ) and Adam ignores the gradient's scale, so with the step a multiple of the start's
    # RMS, scaling every task vector by c scales every iterate by c; the absolute lr does not.
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.zeros(6, 5)}
    experts = [{"w": torch.randn(6, 5, generator=g)} for _ in range(3)]
    scaled = [{"w": e["w"] * 1e-3} for e in experts]
    one = merge(base, experts, steps=50, relative_lr=0.01)["w"]
    small = merge(base, scaled, steps=50, relative_lr=0.01)["w"]
    torch.testing.assert_close(small, one * 1e-3, rtol=1e-4, atol=1e-9)
    taus = torch.stack([e["w"] for e in experts])
    assert interference_loss(one, taus) < interference_loss(taus.sum(0), taus)
    absolute = merge(base, scaled, steps=50, lr=0.01)["w"]
    assert not torch.allclose(absolute, one * 1e-3, rtol=1e-2)
    with pytest.raises(ValueError, match="relative_lr"):
        Params(relative_lr=0.0)
