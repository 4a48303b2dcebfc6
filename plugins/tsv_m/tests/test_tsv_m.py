"""TSV-M against closed forms: orthogonal tasks reduce to task arithmetic; truncation keeps each task's top 1/T."""

from __future__ import annotations

import pytest
import torch
from mergebench_core.engine.tensors import polar_factor
from mergebench_tsv_m import Params, TsvMerge

from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource


def merge(base: dict, experts: list[dict], **params) -> dict:
    out: dict[str, torch.Tensor] = {}
    merge_sources(TsvMerge(Params(**params)), StateDictSource(base), [StateDictSource(e) for e in experts],
                  sink=out, seed=0)
    return out


def block_task(shape, rows, cols, rank, gen) -> torch.Tensor:
    """A task vector of the given rank supported only on rows × cols."""
    t = torch.zeros(shape)
    a = torch.randn(len(rows), rank, generator=gen) @ torch.randn(rank, len(cols), generator=gen)
    t[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = a
    return t


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_orthogonal_tasks_reduce_to_task_arithmetic(alpha):
    # Disjoint row and column supports make the tasks' singular subspaces mutually orthogonal; with each task of
    # rank exactly ⌊r/T⌋ nothing is truncated and the orthogonalisation is the identity, so the 2-D result is
    # task arithmetic with λ = α, while 1-D tensors are averaged (task arithmetic with λ = α / T).
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 8, generator=g), "b": torch.randn(6, generator=g)}
    taus_w = [block_task((6, 8), range(0, 3), range(0, 4), 3, g), block_task((6, 8), range(3, 6), range(4, 8), 3, g)]
    taus_b = [torch.randn(6, generator=g) for _ in range(2)]
    experts = [{"w": base["w"] + tw, "b": base["b"] + tb} for tw, tb in zip(taus_w, taus_b)]
    out = merge(base, experts, alpha=alpha)
    torch.testing.assert_close(out["w"], base["w"] + alpha * (taus_w[0] + taus_w[1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["b"], base["b"] + (alpha / 2) * (taus_b[0] + taus_b[1]), atol=1e-6, rtol=1e-6)


def test_three_orthogonal_tasks_on_a_wide_matrix():
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.zeros(6, 9)}
    taus = [block_task((6, 9), range(2 * i, 2 * i + 2), range(3 * i, 3 * i + 3), 2, g) for i in range(3)]
    out = merge(base, [{"w": t} for t in taus])
    torch.testing.assert_close(out["w"], sum(taus), atol=1e-5, rtol=1e-5)


def test_truncation_keeps_each_tasks_top_direction():
    # 2×2, two tasks: each keeps ⌊2/2⌋ = 1 direction. τ_1 = diag(3, 1) keeps 3·e1e1ᵀ, τ_2 = diag(0.5, 2) keeps
    # 2·e2e2ᵀ; the kept directions are already orthogonal, so the merge is diag(3, 2).
    base = {"w": torch.zeros(2, 2)}
    experts = [{"w": torch.diag(torch.tensor([3.0, 1.0]))}, {"w": torch.diag(torch.tensor([0.5, 2.0]))}]
    torch.testing.assert_close(merge(base, experts)["w"], torch.diag(torch.tensor([3.0, 2.0])))


def test_single_task_is_reconstructed_exactly():
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(5, 7, generator=g)
    out = merge({"w": torch.zeros(5, 7)}, [{"w": tau}], alpha=0.5)
    torch.testing.assert_close(out["w"], 0.5 * tau, atol=1e-5, rtol=1e-5)


def test_overlapping_directions_are_orthogonalised_by_the_polar_factor():
    # Two unit columns at 60°: the polar factor is A (AᵀA)^(-1/2), computed here independently by an
    # eigendecomposition of the 2×2 Gram matrix.
    a = torch.tensor([[1.0, 0.5], [0.0, 3 ** 0.5 / 2], [0.0, 0.0]], dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(a.T @ a)
    expected = a @ (evecs @ torch.diag(evals.rsqrt()) @ evecs.T)
    got = polar_factor(a)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.T @ got, torch.eye(2, dtype=torch.float64))


def test_params_are_validated():
    with pytest.raises(ValueError, match="alpha"):
        Params(alpha=float("nan"))


def test_runs_on_the_digits_pool(digits_pools):
    from mergebench_core import RunContext
    from mergebench_core.data.evaluation import evaluate

    pool, taskpool = digits_pools
    out = TsvMerge().run(pool, RunContext(taskpool=taskpool))
    acc = evaluate(taskpool, out.model, limit=200)
    mean = sum(m["accuracy"] for m in acc.values()) / len(acc)
    assert mean > 0.5, acc  # ten classes per task: chance is 0.1


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)])
def test_a_conv_kernel_is_merged_on_its_matrix_view(kernel):
    # The kernel (out, in, kh, kw) is the matrix out × (in·kh·kw) applied to unfolded patches: TSV-M of the kernel
    # is TSV-M of that matrix, reshaped back (it used to be the mean); the 1-D bias keeps the mean rule.
    from mergebench_tsv_m import tsv_merge_matrix

    from mergebench_core.engine.roles import roles_of

    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(4, 6, kernel)
    base = {k: torch.randn(v.shape, generator=g) for k, v in conv.state_dict().items()}
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    taus = torch.stack([e["weight"] - base["weight"] for e in experts])
    for roles in (roles_of(conv), None):  # from the module, and from the name and shape (a file merge)
        out: dict[str, torch.Tensor] = {}
        method = TsvMerge(Params(alpha=0.8))
        merge_sources(method, StateDictSource(base), [StateDictSource(e) for e in experts], sink=out, roles=roles)
        want = base["weight"] + 0.8 * tsv_merge_matrix(taus.reshape(3, 6, -1)).reshape(taus.shape[1:])
        torch.testing.assert_close(out["weight"], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["bias"], base["bias"] + 0.8 * torch.stack(
            [e["bias"] - base["bias"] for e in experts]).mean(0))
        assert "fallback_tensors" not in method.extras
