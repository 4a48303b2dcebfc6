"""Iso-C and Iso-CTS against closed forms."""

from __future__ import annotations

import pytest
import torch
from mergebench_iso import IsoC, IsoCParams, IsoCTS, IsoCTSParams, iso_c_matrix, iso_cts_matrix, split_dimensions

from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource


def merge(method, base: dict, experts: list[dict]) -> dict:
    out: dict[str, torch.Tensor] = {}
    merge_sources(method, StateDictSource(base), [StateDictSource(e) for e in experts], sink=out, seed=0)
    return out


@pytest.mark.parametrize("alpha", [1.0, 1.3])
def test_iso_c_of_one_task_vector_is_its_mean_singular_value_times_u_v(alpha):
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    v, _ = torch.linalg.qr(torch.randn(7, 5, generator=g))
    sigma = torch.tensor([6.0, 4.0, 2.0, 2.0, 1.0])  # full rank (5 = min(5, 7)), mean 3
    tau = u @ torch.diag(sigma) @ v.T
    base = {"w": torch.randn(5, 7, generator=g), "b": torch.randn(5, generator=g)}
    expert = {"w": base["w"] + tau, "b": base["b"] + 1.0}
    out = merge(IsoC(IsoCParams(scaling_factor=alpha)), base, [expert])
    torch.testing.assert_close(out["w"], base["w"] + alpha * 3.0 * (u @ v.T), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["b"], base["b"] + alpha * 1.0)


def test_iso_c_flattens_the_spectrum_of_the_sum():
    # τ_1 = diag(4, 1), τ_2 = diag(0, 1): the sum diag(4, 2) has mean singular value 3, so the update is 3·I.
    # Non-2-D tensors are averaged: (2 + 4) / 2 = 3.
    base = {"w": torch.zeros(2, 2), "b": torch.zeros(1)}
    experts = [{"w": torch.diag(torch.tensor([4.0, 1.0])), "b": torch.tensor([2.0])},
               {"w": torch.diag(torch.tensor([0.0, 1.0])), "b": torch.tensor([4.0])}]
    out = merge(IsoC(IsoCParams(scaling_factor=1.0)), base, experts)
    torch.testing.assert_close(out["w"], 3.0 * torch.eye(2))
    torch.testing.assert_close(out["b"], torch.tensor([3.0]))


def test_iso_cts_hand_computed_common_and_task_specific_directions():
    # 4×4, two tasks, fraction 0.5: 2 common directions and 1 per task. Σ τ = diag(4, 3, 2, −1): the common
    # subspace is e1, e2 (σ 4, 3); with it projected out, τ_1 keeps 2·e3e3ᵀ and τ_2 keeps −1·e4e4ᵀ. The mean of
    # (2, 1, 4, 3) is 2.5, and the orthonormalised factors give U Vᵀ = diag(1, 1, 1, −1).
    base = {"w": torch.zeros(4, 4)}
    experts = [{"w": torch.diag(torch.tensor([4.0, 0.0, 2.0, 0.0]))},
               {"w": torch.diag(torch.tensor([0.0, 3.0, 0.0, -1.0]))}]
    out = merge(IsoCTS(IsoCTSParams(scaling_factor=2.0, common_space_fraction=0.5)), base, experts)
    torch.testing.assert_close(out["w"], 2.0 * 2.5 * torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.0])),
                               atol=1e-5, rtol=1e-5)


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(6, 9, generator=g)}
    experts = [{"w": base["w"] + torch.randn(6, 9, generator=g)} for _ in range(3)]
    cts = merge(IsoCTS(IsoCTSParams(scaling_factor=1.2, common_space_fraction=1.0)), base, experts)
    c = merge(IsoC(IsoCParams(scaling_factor=1.2)), base, experts)
    torch.testing.assert_close(cts["w"], c["w"], atol=1e-5, rtol=1e-5)


def test_iso_cts_update_is_isotropic_and_differs_from_iso_c():
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.zeros(12, 16)}
    experts = [{"w": torch.randn(12, 16, generator=g) * (t + 1)} for t in range(3)]
    cts = merge(IsoCTS(IsoCTSParams(scaling_factor=1.0)), base, experts)["w"]
    s = torch.linalg.svdvals(cts)
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cts, merge(IsoC(IsoCParams(scaling_factor=1.0)), base, experts)["w"], atol=1e-3)


@pytest.mark.parametrize("rank, tasks, fraction, expected", [
    (768, 8, 0.8, (616, 19)),  # the reference rule on a ViT-B layer: ⌊614.4⌋ = 614, round(154 / 8) = 19
    (4, 2, 0.5, (2, 1)),
    (10, 8, 0.8, (10, 0)),  # too small to give every task a direction: all common
    (12, 8, 0.0, (4, 1)),  # clamped: round(12 / 8) = 2 per task would need 16 > 12 directions
])
def test_split_dimensions(rank, tasks, fraction, expected):
    assert split_dimensions(rank, tasks, fraction) == expected


def test_params_are_validated():
    with pytest.raises(ValueError, match="common_space_fraction"):
        IsoCTSParams(common_space_fraction=1.5)
    with pytest.raises(ValueError, match="scaling_factor"):
        IsoCParams(scaling_factor=float("inf"))


@pytest.mark.parametrize("method", [IsoC, IsoCTS])
def test_runs_on_the_digits_pool(digits_pools, method):
    from mergebench_core import RunContext
    from mergebench_core.data.evaluation import evaluate

    pool, taskpool = digits_pools
    out = method().run(pool, RunContext(taskpool=taskpool))
    acc = evaluate(taskpool, out.model, limit=200)
    mean = sum(m["accuracy"] for m in acc.values()) / len(acc)
    assert mean > 0.5, acc  # ten classes per task: chance is 0.1


@pytest.mark.parametrize("method, matrix", [
    (IsoC(IsoCParams(scaling_factor=1.3)), lambda t: iso_c_matrix(t)),
    (IsoCTS(IsoCTSParams(scaling_factor=1.5)), lambda t: iso_cts_matrix(t, 0.8)),
])
def test_a_conv_kernel_is_merged_on_its_matrix_view(method, matrix):
    # Iso of a 3×3 kernel (out, in, 3, 3) is Iso of its matrix out × (in·9), reshaped back (it used to be the
    # mean); the 1-D bias stays the mean of the task vectors.
    from mergebench_core.engine.roles import roles_of

    g = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(3, 5, 3)
    base = {k: torch.randn(v.shape, generator=g) for k, v in conv.state_dict().items()}
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    taus = torch.stack([e["weight"] - base["weight"] for e in experts])
    out: dict[str, torch.Tensor] = {}
    merge_sources(method, StateDictSource(base), [StateDictSource(e) for e in experts], sink=out,
                  roles=roles_of(conv))
    alpha = method.scale()
    want = base["weight"] + alpha * matrix(taus.reshape(2, 5, 27)).reshape(taus.shape[1:])
    torch.testing.assert_close(out["weight"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["bias"], base["bias"] + alpha * torch.stack(
        [e["bias"] - base["bias"] for e in experts]).mean(0))
