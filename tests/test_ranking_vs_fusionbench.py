"""The ranking report's arithmetic: pool lists with parameters, mean ± std over pools, and Spearman's correlation
per published table over the rows both sides have."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "ranking_vs_fusionbench", Path(__file__).resolve().parent.parent / "bench" / "ranking_vs_fusionbench.py")
ranking = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ranking)


def test_pool_lists_keep_commas_inside_parameters_together():
    assert ranking.split_pools("a, b(x=1,y=2),c(seed=1)") == ["a", "b(x=1,y=2)", "c(seed=1)"]


def test_a_ranking_equal_to_the_published_one_correlates_perfectly_and_a_reversed_one_negatively():
    gpt2 = ranking.PUBLISHED_TABLES["gpt2_glue7"]
    merges = ["simple_average", "fisher", "regmean", "task_arithmetic"]  # published 56.1 < 58.7 < 68.8 < 70.0
    same = {m: float(i) for i, m in enumerate(merges)}
    assert ranking.correlation(same, gpt2, merges_only=True) == (pytest.approx(1.0), 4)
    reversed_ = {m: -float(i) for i, m in enumerate(merges)}
    assert ranking.correlation(reversed_, gpt2, merges_only=True)[0] == pytest.approx(-1.0)
    rho, n = ranking.correlation({"ties": 1.0, "fisher": 2.0}, gpt2, merges_only=True)
    assert n == 2 and math.isnan(rho)  # two pairs say nothing about a ranking


def test_the_report_gives_mean_and_std_over_pools():
    per_pool = {"p": {"ties": 70.0, "task_arithmetic": 60.0}, "p(seed=1)": {"ties": 72.0, "task_arithmetic": 62.0}}
    lines = ranking.report(per_pool)
    ties = next(line for line in lines if line.startswith("| ties |"))
    assert ties.endswith("| 71.0 ± 1.4 |")
    assert any(line.startswith("| regmean |") and line.endswith("| — |") for line in lines)
    assert any("not in the store" in line and "regmean" in line for line in lines)
