"""TATR: a hand-computed conflict mask, parity with FusionBench 0.2.33's zero-shot variant, the mean absolute
gradient against an independent per-example loop, and a run on the embedded pool."""

from __future__ import annotations

import pytest
import torch
from mergebench_ta_trust_region import (
    Params,
    TrustRegion,
    TrustRegionZeroShot,
    ZeroShotParams,
    conflict_scores,
    trust_region_merge,
)
from torch import nn


def test_hand_computed_mask():
    # Two tasks, four entries. |τ_1| = [1, 2, 0, 3], |τ_2| = [2, 1, 4, 3]; importances g_1 = [1, 0, 1, 1],
    # g_2 = [0, 1, 1, 1]. Ω = g_1|τ_2| + g_2|τ_1| = [2, 2, 4, 6]. q = 0.5: index ⌊4·0.5⌋ = 2 of the sorted
    # [2, 2, 4, 6] is 4, so entries with Ω < 4 (the first two) are kept.
    base = {"w": torch.zeros(4)}
    taus = {"w": torch.tensor([[1.0, -2.0, 0.0, 3.0], [2.0, 1.0, -4.0, -3.0]])}
    g = [{"w": torch.tensor([1.0, 0.0, 1.0, 1.0])}, {"w": torch.tensor([0.0, 1.0, 1.0, 1.0])}]
    torch.testing.assert_close(conflict_scores(g, taus)["w"], torch.tensor([2.0, 2.0, 4.0, 6.0]))
    merged, kept = trust_region_merge(base, taus, g, scaling_factor=0.5, quantile=0.5)
    torch.testing.assert_close(merged["w"], torch.tensor([1.5, -0.5, 0.0, 0.0]))
    assert kept == 0.5


def test_zero_shot_scores_are_the_pairwise_products():
    gen = torch.Generator().manual_seed(0)
    taus = {"w": torch.randn(3, 5, 4, generator=gen)}
    imps = [{"w": taus["w"][i].abs()} for i in range(3)]
    a = taus["w"].abs()
    want = a[0] * a[1] * 2 + a[0] * a[2] * 2 + a[1] * a[2] * 2
    torch.testing.assert_close(conflict_scores(imps, taus)["w"], want)


def test_quantile_one_keeps_everything_below_the_maximum():
    # q = 1 clamps the index to n − 1: only the entries holding the maximal Ω are dropped
    base = {"w": torch.zeros(3)}
    taus = {"w": torch.tensor([[1.0, 1.0, 5.0], [1.0, 1.0, 5.0]])}
    imps = [{"w": t.abs()} for t in taus["w"]]
    merged, _ = trust_region_merge(base, taus, imps, scaling_factor=1.0, quantile=1.0)
    torch.testing.assert_close(merged["w"], torch.tensor([2.0, 2.0, 0.0]))


class _Pool:
    """A minimal model pool over in-memory MLPs (the ModelPool surface TATR reads)."""

    name, has_pretrained, relation = "toy", True, "finetuned"

    def __init__(self, models: dict[str, nn.Module]):
        self.models = models
        self.expert_names = [n for n in models if n != "__pretrained__"]

    def load_model(self, name):
        import copy
        return copy.deepcopy(self.models[name])

    def state_dict(self, name):
        return {k: v.detach().clone() for k, v in self.models[name].state_dict().items()}

    def task_of(self, expert):
        return expert


def toy_models(seed: int = 0, n: int = 3) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    models = {"__pretrained__": base}
    for i in range(n):
        m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        m.load_state_dict({k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()})
        models[f"t{i}"] = m
    return models


@pytest.mark.parametrize("quantile", [0.99, 0.7])
def test_zero_shot_parity_with_fusion_bench(quantile, monkeypatch):
    tr = pytest.importorskip("fusion_bench.method.trust_region.clip_task_arithmetic")
    from fusion_bench import BaseModelPool

    from mergebench_core import PRETRAINED, RunContext

    models = toy_models()
    pool = _Pool({PRETRAINED if k == "__pretrained__" else k: v for k, v in models.items()})
    pool.expert_names = [n for n in pool.models if n != PRETRAINED]
    ours = TrustRegionZeroShot(ZeroShotParams(scaling_factor=0.3, threshold_quantile=quantile)).run(
        pool, RunContext()).model.state_dict()
    fb_pool = BaseModelPool({"_pretrained_": models["__pretrained__"],
                             **{k: v for k, v in models.items() if k != "__pretrained__"}})
    algo = tr.TaskArithmeticWithTrustRegionForCLIP(scaling_factor=0.3, threshold_quantile=quantile, max_samples=1,
                                                   batch_size=1, zero_shot=True)
    theirs = algo.run(fb_pool).state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5)


def test_mean_abs_gradient_matches_a_per_example_loop(digits_pools):
    from mergebench_core import PRETRAINED
    from mergebench_core.data.statistics import LogitsOf, mean_abs_gradient

    pool, taskpool = digits_pools
    task = taskpool.tasks[0]
    model = pool.load_model(PRETRAINED)
    got = mean_abs_gradient(model, taskpool, task, n_examples=12, batch_size=5)
    wrapper = LogitsOf(model, taskpool, task)
    want = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    (x, y), = list(taskpool.batches(task, "train", batch_size=12, limit=12))
    for i in range(12):
        model.zero_grad()
        nn.functional.cross_entropy(wrapper(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in model.named_parameters():
            want[k] += p.grad.abs() / 12
    for k, value in want.items():
        torch.testing.assert_close(got[k], value, atol=1e-6, rtol=1e-4)


def test_params_are_validated():
    with pytest.raises(ValueError, match="threshold_quantile"):
        ZeroShotParams(threshold_quantile=1.5)
    with pytest.raises(ValueError):
        Params(n_examples=0)


def test_runs_on_the_digits_pool(digits_pools, tmp_path):
    from mergebench_core import RunContext
    from mergebench_core.data.evaluation import evaluate

    pool, taskpool = digits_pools
    out = TrustRegion(Params(n_examples=32)).run(pool, RunContext(taskpool=taskpool, cache_dir=tmp_path))
    assert 0.95 < out.extras["kept_fraction"] < 0.999
    acc = evaluate(taskpool, out.model, limit=200)
    assert sum(m["accuracy"] for m in acc.values()) / len(acc) > 0.5
