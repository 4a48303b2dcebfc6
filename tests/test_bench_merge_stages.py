"""The stage benchmark's pure parts: method lists, the order of runs in a round, and the paired summary (no timing
is asserted: performance lives in bench/, never in tests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "merge_stages", Path(__file__).resolve().parent.parent / "bench" / "merge_stages.py")
stages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stages)


def test_presets_plain_names_and_overrides():
    assert stages.method_spec("ties_tensor") == ("ties_tensor", "ties", ["ties.scope=tensor"])
    assert stages.method_spec("della") == ("della", "della", [])
    assert stages.method_spec("magmax") == ("magmax", "magmax", [])
    assert stages.method_spec("ties_tensor:ties.k=0.1, ties.scope=tensor") == \
        ("ties_tensor:ties.k=0.1,ties.scope=tensor", "ties", ["ties.k=0.1", "ties.scope=tensor"])
    label = stages.method_spec("ties_tensor:ties.k=0.1")[0]
    assert stages.method_spec(label) == (label, "ties", ["ties.k=0.1"])  # a label reads back as itself
    with pytest.raises(ValueError):
        stages.method_spec(" :x=1")


def test_a_round_runs_the_shared_stages_once_and_alternates_its_order():
    first = stages.round_order(["a", "b"], 0)
    assert first == [("floor", ""), ("transfer", ""), ("kernel", "a"), ("merge", "a"), ("kernel", "b"),
                     ("merge", "b")]
    assert stages.round_order(["a", "b"], 1) == first[::-1]


def test_summary_takes_medians_increments_and_ratios_to_the_floor_of_the_same_round():
    def run(seconds, cpu=None, rss=100.0):
        return {"seconds": seconds, "cpu": cpu if cpu is not None else seconds, "rss": rss}

    rounds = [
        {("floor", ""): run(1.0), ("transfer", ""): run(2.0), ("kernel", "m"): run(3.0), ("merge", "m"): run(4.0)},
        {("floor", ""): run(2.0), ("transfer", ""): run(3.0), ("kernel", "m"): run(4.0), ("merge", "m"): run(6.0)},
        {("floor", ""): run(4.0), ("transfer", ""): run(5.0), ("kernel", "m"): run(9.0), ("merge", "m"): run(12.0)},
    ]
    s = stages.summarise(rounds, "m")
    assert [s[k]["seconds"] for k in stages.STAGES] == [2.0, 3.0, 4.0, 6.0]
    assert [s[k]["increment"] for k in stages.STAGES] == [2.0, 1.0, 1.0, 2.0]
    # merge / floor per round: 4, 3, 3 -> median 3 (the ratio of the medians would also be 3; kernel differs)
    assert s["merge"]["ratio"] == 3.0
    assert s["kernel"]["ratio"] == 2.25  # 3/1, 4/2, 9/4: median 2.25, while the medians' ratio is 4/2 = 2
    assert s["floor"]["ratio"] == 1.0
    table = stages.format_table({"m": s})
    assert "| m | kernel | 4.000 | +1.000 | 2.25x |" in table


def test_pairs_with_a_baseline_are_ratios_taken_round_by_round():
    def run(seconds, cpu):
        return {"seconds": seconds, "cpu": cpu, "rss": 1.0}

    this = [{("floor", ""): run(1.0, 1.0), ("kernel", "m"): run(2.0, 1.0)},
            {("floor", ""): run(4.0, 1.0), ("kernel", "m"): run(8.0, 3.0)}]
    base = [{("floor", ""): run(1.0, 2.0), ("kernel", "m"): run(4.0, 2.0)},
            {("floor", ""): run(2.0, 2.0), ("kernel", "m"): run(4.0, 2.0)}]
    ratios = stages.paired(this, base, "m")
    assert ratios["floor"] == (1.5, 0.5)  # wall 1/1 and 4/2; CPU 1/2 twice
    assert ratios["kernel"] == (1.25, 1.0)  # wall 0.5 and 2; CPU 0.5 and 1.5
    assert "merge" not in ratios
