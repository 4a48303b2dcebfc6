"""The seed-stability report's arithmetic: mean ± std over expert seeds, ranks per seed, ρ between every pair."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def stability():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling `sensitivity`, as it does when run from bench/
    try:
        spec = importlib.util.spec_from_file_location("seed_stability", BENCH / "seed_stability.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_identical_rankings_correlate_perfectly_and_a_reversed_seed_negatively(stability):
    a = {"ties": 80.0, "task_arithmetic": 70.0, "simple_average": 60.0}
    b = {"ties": 81.0, "task_arithmetic": 75.0, "simple_average": 50.0}  # other values, the same order
    c = {"ties": 50.0, "task_arithmetic": 60.0, "simple_average": 70.0}  # the order reversed
    pairs = stability.seed_correlations([a, b, c])
    assert [(i, j, n) for i, j, _, n in pairs] == [(0, 1, 3), (0, 2, 3), (1, 2, 3)]
    assert [r for _, _, r, _ in pairs] == [pytest.approx(1.0), pytest.approx(-1.0), pytest.approx(-1.0)]


def test_the_report_gives_mean_std_ranks_and_the_mean_correlation(stability):
    per_seed = [{"ties": 80.0, "task_arithmetic": 70.0, "simple_average": 60.0},
                {"ties": 82.0, "task_arithmetic": 72.0, "simple_average": 62.0}]
    lines = stability.report("p", [0, 1], per_seed)
    assert "| ties | 81.0 ± 1.4 | 80.0 (1) | 82.0 (1) |" in lines
    assert "| simple_average | 61.0 ± 1.4 | 60.0 (3) | 62.0 (3) |" in lines
    assert "| mean | 1.00 | |" in lines
