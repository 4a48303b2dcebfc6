"""Model Breadcrumbs against hand-computed masks (outliers and small entries removed, exact counts, ties)."""

import pytest
import torch

from mergebench_breadcrumbs import Breadcrumbs, Params, breadcrumbs_mask
from mergebench_core import RunContext
from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.errors import ConfigError
from mergebench_core.data.evaluation import evaluate
from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource


def merge(params, base, experts):
    out = {}
    merge_sources(Breadcrumbs(params), StateDictSource(base, "base"),
                  [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out)
    return out


def test_removes_the_top_gamma_and_enough_small_entries_to_reach_density():
    # n = 10, density 0.7 keeps 7; γ = 0.1 removes the 1 largest (-10), so the 2 smallest (1, -2) go too.
    # τ1 -> [3, 0, 0, 7, 0, 5, 9, -4, 6, 8]
    # τ2 = [1, 1, 1, 1, 1, 1, 1, 1, 1, 50]: top 1 is 50; the nine 1s rank in index order (the earlier first), so
    #    ranks 2..8 keep the first seven -> [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    base = {"w": torch.full((10,), 2.0)}
    tau1 = torch.tensor([3.0, -10.0, 1.0, 7.0, -2.0, 5.0, 9.0, -4.0, 6.0, 8.0])
    tau2 = torch.tensor([1.0] * 9 + [50.0])
    out = merge(Params(density=0.7, gamma=0.1, scaling_factor=0.5), base,
                [{"w": base["w"] + tau1}, {"w": base["w"] + tau2}])
    kept = torch.tensor([4.0, 1, 1, 8, 1, 6, 10, -4, 6, 8])
    assert torch.allclose(out["w"], base["w"] + 0.5 * kept)


def test_ties_in_magnitude_go_to_the_earlier_entry():
    # [2, 2, 1, 1] ranks as indices 0, 1, 2, 3: γ = 0.25 removes rank 1 (index 0); density 0.5 keeps ranks 2 and
    # 3 (indices 1 and 2), so the later 1 goes.
    mask = breadcrumbs_mask(torch.tensor([2.0, -2.0, 1.0, -1.0]), keep=0.5, skip_top=0.25)
    assert mask.tolist() == [False, True, True, False]


@pytest.mark.parametrize("density,gamma,expected", [
    (0.95, 0.1, [True] * 9 + [False]),  # γ + density > 1: ⌊9.5⌋ = 9 kept, so only 1 outlier goes, no small one
    (1.0, 0.01, [True] * 10),           # keep everything
    (0.0, 0.0, [False] * 10),           # keep nothing
    (0.5, 0.0, [False] * 5 + [True] * 5),  # plain magnitude pruning
])
def test_edge_densities(density, gamma, expected):
    assert breadcrumbs_mask(torch.arange(1.0, 11.0), density, gamma).tolist() == expected


def test_streaming_equals_the_reference_with_many_ties():
    from mergebench_core.testing import reference_outputs

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(80, 70, generator=g), "b": torch.randn(5000, generator=g),
            "s": torch.randn(3, generator=g)}
    experts = [{k: v + torch.randint(-3, 4, v.shape, generator=g) * 0.5 for k, v in base.items()} for _ in range(3)]
    for density, gamma in ((0.9, 0.01), (0.5, 0.2), (0.95, 0.1)):
        method = Breadcrumbs(Params(density=density, gamma=gamma))
        want = reference_outputs(method.pipeline(), base, experts)
        for block in (1 << 22, 999):
            out = {}
            merge_sources(method, StateDictSource(base), [StateDictSource(e) for e in experts], sink=out,
                          block_entries=block)
            assert all(torch.equal(out[k], want[k]) for k in base), (density, gamma, block)


def test_zero_task_vectors_return_the_base():
    base = {"w": torch.randn(5, 4), "b": torch.randn(4)}
    out = merge(Params(), base, [base, base])
    assert all(torch.equal(out[k], base[k]) for k in base)


def test_bad_parameters_are_refused():
    with pytest.raises(ConfigError, match="density must be a fraction"):
        build_params("breadcrumbs", Params, {}, parse_overrides(["breadcrumbs.density=1.5"]))
    with pytest.raises(ConfigError, match="gamma must be a fraction"):
        build_params("breadcrumbs", Params, {}, parse_overrides(["breadcrumbs.gamma=-0.1"]))


def test_on_the_embedded_pool(digits_pools):
    pool, taskpool = digits_pools
    out = Breadcrumbs().run(pool, RunContext(taskpool=taskpool))
    metrics = evaluate(taskpool, out.model)
    pretrained = evaluate(taskpool, pool.load_model("_pretrained_"))
    mean = sum(m["accuracy"] for m in metrics.values()) / len(metrics)
    assert mean > sum(m["accuracy"] for m in pretrained.values()) / len(pretrained)
