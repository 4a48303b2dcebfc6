"""The batch-norm rule (`engine.bn_stats.BnStats`): parsed and checked once, and saying who applies it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergebench_core.engine.bn_stats import BN_STATS_RULES, BnStats
from mergebench_core.engine.roles import check_bn_stats, roles_of
from mergebench_core.engine.running_stats import rule_value, settle_running_stats
from mergebench_core.errors import ConfigError, MergebenchError


def test_parse_takes_each_rule_once_and_refuses_others_with_a_suggestion():
    assert [BnStats.parse(r).name for r in BN_STATS_RULES] == ["base", "mean", "recompute"]
    assert BnStats.parse(None) == BnStats() == BnStats("mean")
    rule = BnStats.parse(" base ")
    assert BnStats.parse(rule) is rule and str(rule) == "base"
    with pytest.raises(ConfigError, match=r"bn_stats 'recompte' \(did you mean 'recompute'\?\): use one of base, "
                                          r"mean, recompute"):
        BnStats.parse("recompte")
    with pytest.raises(ConfigError, match="bn_stats 'zzz': use one of"):
        BnStats("zzz")
    assert check_bn_stats("mean") == "mean"  # the older function, through the same rule
    with pytest.raises(ConfigError, match="bn_stats 'median'"):
        check_bn_stats("median")


@pytest.mark.parametrize(("name", "merging", "streamed", "other", "data"), [
    ("base", "base", "engine", "runner", False),
    ("mean", "mean", "engine", "runner", False),
    ("recompute", "mean", "runner", "runner", True),
])
def test_the_rule_says_what_the_engine_writes_and_who_applies_it(name, merging, streamed, other, data):
    rule = BnStats(name)
    assert rule.while_merging == merging and rule.needs_data is data
    assert rule.applied_by(streamed=True) == streamed and rule.applied_by(streamed=False) == other


class TwoNorms(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.bn.running_mean.fill_(value)


class Pool:
    """A pool of a base (running mean 0) and experts of running means 2 and 4."""
    name, has_pretrained, expert_names = "p", True, ["a", "b"]

    def state_dict(self, name):
        return TwoNorms({"_pretrained_": 0.0, "a": 2.0, "b": 4.0}[name]).state_dict()


@pytest.mark.parametrize(("rule", "streamed", "expected"), [
    ("mean", False, 3.0), ("base", False, 0.0),  # the runner applies the rule to a merge it did not stream
    ("mean", True, 9.0), ("base", True, 9.0),    # the engine already did: the output is left as it is
])
def test_settling_follows_who_the_rule_says_applies_it(rule, streamed, expected):
    model = TwoNorms(9.0)
    extras = settle_running_stats(model, Pool(), BnStats(rule), roles_of(model), taskpool=None, tasks=(),
                                  set_by_engine=streamed)
    assert extras == {"bn_stats": rule}
    assert model.bn.running_mean.tolist() == [expected, expected]


def test_recompute_needs_a_task_pool_and_is_no_value_while_merging():
    model = TwoNorms(9.0)
    with pytest.raises(MergebenchError, match="bn_stats=recompute measures running statistics on training data"):
        settle_running_stats(model, Pool(), "recompute", roles_of(model), taskpool=None, tasks=(),
                             set_by_engine=True)
    with pytest.raises(MergebenchError, match="'base' or 'mean' only"):
        rule_value("bn.running_mean", "recompute", torch.zeros(2), [torch.ones(2)])
    assert rule_value("bn.running_mean", BnStats("mean"), None, [torch.ones(2), torch.full((2,), 3.0)]).tolist() == \
        [2.0, 2.0]
