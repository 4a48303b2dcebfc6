"""pa_ties: the uniform preference is `ties` bit for bit; a vertex preference on a hand-made case; the two election
conventions; and an independent whole-model reference on the embedded pool."""

from __future__ import annotations

import pytest
import torch
from mergebench_pa_ties import Params, PreferenceTies, weighted_elect_and_combine
from mergebench_ties import Params as TiesParams
from mergebench_ties import Ties, elect_and_combine
from torch import nn

from mergebench_core import PRETRAINED, ModelPool, RunContext
from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.errors import ConfigError, MergebenchError
from mergebench_core.pools.views import TaskSubsetModelPool, TaskSubsetTaskPool
from mergebench_core.engine.sparsify import keep_count, topk_mask

SCOPES_AND_COMBINES = [(s, c) for s in ("global", "tensor") for c in ("sum", "mean")]


def state(output):
    return output.model.state_dict()


# --- the uniform preference is ties ------------------------------------------------------------------------------


@pytest.mark.parametrize("scope,combine", SCOPES_AND_COMBINES)
def test_uniform_preference_is_ties_bit_for_bit(digits_pools, scope, combine):
    pool, taskpool = digits_pools
    tasks = tuple(taskpool.tasks)
    ctx = RunContext(taskpool=taskpool, tasks=tasks)
    ties = state(Ties(TiesParams(scope=scope, combine=combine)).run(pool, ctx))
    uniform = RunContext(taskpool=taskpool, tasks=tasks, preference=tuple(1 / len(tasks) for _ in tasks))
    for weighted_election in (True, False):  # with equal weights the two elections are one
        params = Params(scope=scope, combine=combine, weighted_election=weighted_election)
        out = PreferenceTies(params).run(pool, uniform)
        assert out.extras["task_weights"] == {t: 1.0 for t in tasks}
        merged = state(out)
        assert merged.keys() == ties.keys()
        for key in ties:
            assert torch.equal(merged[key], ties[key]), (scope, combine, weighted_election, key)
    # a cell without a preference is uniform over its tasks; a context without tasks is plain ties
    for ctx_none in (ctx, RunContext(taskpool=taskpool)):
        merged = state(PreferenceTies(Params(scope=scope, combine=combine)).run(pool, ctx_none))
        assert all(torch.equal(merged[key], ties[key]) for key in ties)


def test_uniform_preference_over_three_tasks_is_ties_bit_for_bit(digits_pools):
    # 3 · (1/3) is not exactly 1 in every arithmetic; the weights must still come out as exactly 1.0
    pool, taskpool = digits_pools
    tasks = ["digits", "rot90", "mirror"]
    sub_pool, sub_tasks = TaskSubsetModelPool(pool, tasks, "sub"), TaskSubsetTaskPool(taskpool, tasks, "sub_tasks")
    ties = state(Ties(TiesParams()).run(sub_pool, RunContext(taskpool=sub_tasks, tasks=tuple(tasks))))
    ctx = RunContext(taskpool=sub_tasks, tasks=tuple(tasks), preference=(1 / 3, 1 / 3, 1 / 3))
    merged = state(PreferenceTies(Params()).run(sub_pool, ctx))
    assert all(torch.equal(merged[key], ties[key]) for key in ties)


def test_unit_weights_reproduce_the_ties_kernel():
    g = torch.Generator().manual_seed(0)
    trimmed = torch.randint(-3, 4, (4, 50, 7), generator=g).float() * 0.5  # many exact cancellations
    for combine in ("sum", "mean"):
        for weighted_election in (True, False):
            got = weighted_elect_and_combine(trimmed.clone(), torch.ones(4), combine, weighted_election)
            assert torch.equal(got, elect_and_combine(trimmed.clone(), combine))


# --- a hand-made pool: two experts, six entries ------------------------------------------------------------------


class Vector(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(values, dtype=torch.float32).clone(), requires_grad=False)


class HandPool(ModelPool):
    """Experts "a" and "b" (one task each) over a single six-entry tensor `w`."""

    name = "hand"

    def __init__(self, base, a, b):
        self.models = {PRETRAINED: base, "a": a, "b": b}

    @property
    def expert_names(self):
        return ["a", "b"]

    def load_model(self, name):
        return Vector(self.models[name])


BASE = [1.0, -1.0, 0.5, 2.0, 0.0, -0.5]
TAU_A = [3.0, -1.0, 2.0, 0.5, -2.0, 1.5]
TAU_B = [-1.0, 4.0, -3.0, 0.25, -2.5, 2.0]
HAND = HandPool(BASE, [x + t for x, t in zip(BASE, TAU_A)], [x + t for x, t in zip(BASE, TAU_B)])
# k = 0.5 keeps ⌊0.5·6⌋ = 3 entries of each unweighted τ:
#   trim(τ_a) = [3, 0, 2, 0, -2, 0]      (|3|, then |2| at 2 and 4; |1.5| and below dropped)
#   trim(τ_b) = [0, 4, -3, 0, -2.5, 0]   (|4|, |3|, |2.5|)
# column 2 is a conflict that b wins unweighted (2 − 3 < 0); column 4 is an agreement.


def hand_merge(preference, **params):
    ctx = RunContext(tasks=("a", "b"), preference=preference)
    out = PreferenceTies(Params(k=0.5, scaling_factor=0.5, **params)).run(HAND, ctx)
    return out.model.w.detach(), out.extras


def expected(combined):
    return torch.tensor(BASE) + 0.5 * torch.tensor(combined)


@pytest.mark.parametrize("scope,combine", SCOPES_AND_COMBINES)
def test_vertex_preference_by_hand(scope, combine):
    # r = (1, 0): w = (2, 0). Weighted trimmed vectors: [6, 0, 4, 0, -4, 0] and zeros.
    # Weighted election: sums [6, 0, 4, 0, -4, 0] -> +, (0: +), +, (0: +), -, (0: +); only a's
    # entries are non-zero, each alone in its column, so sum and mean agree: combined = [6, 0, 4, 0, -4, 0],
    # which is 2·trim(τ_a): the preferred expert's TIES vector at the strength of the whole sum.
    got, extras = hand_merge((1.0, 0.0), scope=scope, combine=combine)
    torch.testing.assert_close(got, expected([6, 0, 4, 0, -4, 0]), rtol=0, atol=0)
    assert extras["task_weights"] == {"a": 2.0, "b": 0.0} and extras["preference"] == {"a": 1.0, "b": 0.0}
    assert extras["weighted_election"] is True
    # Unweighted election: sums of trimmed [3, 4, -1, 0, -4.5, 0] -> +, +, -, (0: +), -, (0: +); the zero columns
    # hold no entry, so they take nothing. b (weight 0) wins column 2 and a's 2·2 disagrees with it:
    # combined = [6, 0, 0, 0, -4, 0]; column 1 elects b's + but b's weighted entry is 0.
    got, extras = hand_merge((1.0, 0.0), scope=scope, combine=combine, weighted_election=False)
    torch.testing.assert_close(got, expected([6, 0, 0, 0, -4, 0]), rtol=0, atol=0)
    assert extras["weighted_election"] is False


@pytest.mark.parametrize("combine,combined", [("sum", [1.5, 6, -4.5, 0, -4.75, 0]),
                                              ("mean", [1.5, 6, -4.5, 0, -2.375, 0])])
def test_interior_preference_by_hand(combine, combined):
    # r = (0.25, 0.75): w = (0.5, 1.5). Weighted: a -> [1.5, 0, 1, 0, -1, 0], b -> [0, 6, -4.5, 0, -3.75, 0].
    # Both elections give +, +, -, (0: +), -, (0: +) here. Column 4: a and b agree: sum -4.75, mean over 2 -> -2.375;
    # column 2: only b's -4.5 agrees.
    for weighted_election in (True, False):
        got, _ = hand_merge((0.25, 0.75), combine=combine, weighted_election=weighted_election)
        torch.testing.assert_close(got, expected(combined), rtol=0, atol=0)


def test_the_other_vertex_and_the_given_scale_of_the_preference():
    # r = (0, 1): w = (0, 2): 2·trim(τ_b) = [0, 8, -6, 0, -5, 0], whatever the election (b is alone with weight,
    # and unweighted a loses column 2 and agrees on column 4)
    for weighted_election in (True, False):
        got, _ = hand_merge((0.0, 1.0), weighted_election=weighted_election)
        torch.testing.assert_close(got, expected([0, 8, -6, 0, -5, 0]), rtol=0, atol=0)


def test_a_preference_that_misses_an_experts_task_is_refused():
    with pytest.raises(MergebenchError, match="experts for b"):
        PreferenceTies(Params()).run(HAND, RunContext(tasks=("a", "c"), preference=(0.5, 0.5)))


# --- an independent whole-model reference on the embedded pool --------------------------------------------------


def reference_pa_ties(base, experts, weights, k, lam, combine, scope, weighted_election):
    """Preference-aware TIES written directly, with the whole model in memory."""
    keys = [key for key, v in base.items() if v.is_floating_point()]
    sizes = [base[key].numel() for key in keys]
    taus = torch.stack([torch.cat([(e[key] - base[key]).flatten() for key in keys]) for e in experts])
    if scope == "global":
        keep = torch.stack([topk_mask(row, keep_count(k, row.numel())) for row in taus])
    else:
        keep = torch.cat([torch.stack([topk_mask(row, keep_count(k, row.numel())) for row in part])
                          for part in taus.split(sizes, 1)], 1)
    trimmed = taus * keep
    weighted = trimmed * weights.view(-1, 1)
    out = {}
    for key, seg_w, seg_u in zip(keys, weighted.split(sizes, 1), trimmed.split(sizes, 1)):
        sign = torch.sign((seg_w if weighted_election else seg_u).sum(0))
        sign[sign == 0] = 1  # a zero sum elects + (the core pipeline's rule)
        agree = (torch.sign(seg_w) == sign) & (seg_w != 0)
        merged = (seg_w * agree).sum(0)
        if combine == "mean":
            merged = merged / agree.sum(0).clamp(min=1)
        out[key] = base[key] + lam * merged.view(base[key].shape)
    return out


@pytest.mark.parametrize("preference", [(0.6, 0.3, 0.1), (0.75, 0.25, 0.0)])
def test_matches_an_independent_reference_on_the_embedded_pool(digits_pools, preference):
    # (0.75, 0.25, 0) also checks that a zero weight does not change what the task keeps (its unweighted vote)
    pool, taskpool = digits_pools
    tasks = ["digits", "rot90", "mirror"]
    sub_pool, sub_tasks = TaskSubsetModelPool(pool, tasks, "sub"), TaskSubsetTaskPool(taskpool, tasks, "sub_tasks")
    ctx = RunContext(taskpool=sub_tasks, tasks=tuple(tasks), preference=preference)
    base = pool.state_dict(PRETRAINED)
    experts = [pool.state_dict(t) for t in tasks]
    weights = torch.tensor([3 * r for r in preference], dtype=torch.float32)
    for scope, combine in SCOPES_AND_COMBINES:
        for weighted_election in (True, False):
            params = Params(k=0.2, combine=combine, scope=scope, weighted_election=weighted_election)
            got = state(PreferenceTies(params).run(sub_pool, ctx))
            want = reference_pa_ties(base, experts, weights, 0.2, 0.3, combine, scope, weighted_election)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6,
                                           msg=lambda m: f"{scope} {combine} {weighted_election} {key}: {m}")


def test_the_two_elections_differ_on_the_embedded_pool(digits_pools):
    pool, taskpool = digits_pools
    tasks = ["digits", "rot90"]
    sub_pool, sub_tasks = TaskSubsetModelPool(pool, tasks, "sub"), TaskSubsetTaskPool(taskpool, tasks, "sub_tasks")
    ctx = RunContext(taskpool=sub_tasks, tasks=tuple(tasks), preference=(0.9, 0.1))
    a = state(PreferenceTies(Params()).run(sub_pool, ctx))
    b = state(PreferenceTies(Params(weighted_election=False)).run(sub_pool, ctx))
    assert any(not torch.equal(a[key], b[key]) for key in a)


# --- parameters and registration ---------------------------------------------------------------------------------


def test_parameters_and_flags():
    params = build_params("pa_ties", Params, {}, parse_overrides(["pa_ties.weighted_election=false", "method.k=0.1"]))
    assert [(p.weighted_election, p.k, p.scope, p.combine, p.scaling_factor) for p in params] == \
        [(False, 0.1, "global", "sum", 0.3)]
    with pytest.raises(ConfigError, match="combine must be 'sum' or 'mean'"):
        build_params("pa_ties", Params, {}, parse_overrides(["pa_ties.combine=max"]))
    info = PreferenceTies.info
    assert (info.kind, info.data, info.preference_aware) == ("merge", "none", True)
    assert PreferenceTies.needs_task_vectors()


def test_is_registered_under_its_name():
    from mergebench_core.contract.registry import get_registry

    reg = get_registry().method_registration("pa_ties")
    assert reg.obj is PreferenceTies and reg.distribution == "mergebench-pa-ties"
