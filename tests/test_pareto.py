"""Pareto analysis: every expected value below is worked out by hand in the comments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mergebench_core.preferences.pareto import front_summaries, hypervolume, non_dominated, render_pareto
from mergebench_core.results.store import CellResult

# ---------------------------------------------------------------------------------------------------- non_dominated


def test_non_dominated_ties_and_duplicates_maximised():
    points = [(1, 2), (2, 1), (1, 2), (1, 1), (0, 2), (3, 0)]
    # (1,2) twice: duplicates, neither dominates the other -> both kept; (2,1) and (3,0) trade off against them;
    # (1,1) is beaten by (1,2) in y with a tie in x; (0,2) is beaten by (1,2) in x with a tie in y.
    assert non_dominated(points).tolist() == [True, True, True, False, False, True]


def test_non_dominated_minimised():
    points = [(1, 2), (2, 1), (1, 2), (1, 1), (0, 2), (3, 0)]
    # minimising: (1,1) beats (1,2) twice and (2,1); (0,2), (1,1), (3,0) trade off.
    assert non_dominated(points, maximize=False).tolist() == [False, False, False, True, True, True]


def test_non_dominated_three_objectives():
    points = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0), (1, 1, 0)]
    # (1,1,0) dominates (1,0,0), (0,1,0) and (0,0,0); (0,0,1) is alone in the third objective.
    assert non_dominated(points).tolist() == [False, False, True, False, True]


def test_non_dominated_matches_brute_force():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 4, size=(60, 3)).astype(float)  # small integers: many ties and duplicates
    expected = [not any((q >= p).all() and (q > p).any() for q in pts) for p in pts]
    assert non_dominated(pts).tolist() == expected


def test_non_dominated_rejects_1d():
    with pytest.raises(ValueError, match="2-D"):
        non_dominated([1.0, 2.0])


# ------------------------------------------------------------------------------------------------------ hypervolume


def test_hypervolume_2d_maximised():
    # staircase above (0,0): columns x in (0,1] height 3, (1,2] height 2, (2,3] height 1 -> 3 + 2 + 1 = 6
    assert hypervolume([(1, 3), (2, 2), (3, 1)], ref=(0, 0)) == pytest.approx(6.0)


def test_hypervolume_2d_minimised():
    # below (4,4): columns x in [1,2) height 1, [2,3) height 2, [3,4) height 3 -> 6
    assert hypervolume([(1, 3), (2, 2), (3, 1)], ref=(4, 4), maximize=False) == pytest.approx(6.0)


def test_hypervolume_convention_matters():
    # (1,1) is below (2,2): it bounds a unit box when minimising, nothing when maximising
    assert hypervolume([(1, 1)], ref=(2, 2), maximize=False) == pytest.approx(1.0)
    assert hypervolume([(1, 1)], ref=(2, 2), maximize=True) == 0.0


def test_hypervolume_3d_inclusion_exclusion():
    a, b, c = (3, 1, 1), (1, 3, 1), (1, 1, 3)
    # three boxes of volume 3; every pairwise and the triple intersection is the unit cube:
    # 3 + 3 + 3 - 1 - 1 - 1 + 1 = 7
    assert hypervolume([a, b, c], ref=(0, 0, 0)) == pytest.approx(7.0)
    # adding d = (2,2,2): its cube (8) swallows all of a, b, c except one unit slab each -> 8 + 3 = 11
    assert hypervolume([a, b, c, (2, 2, 2)], ref=(0, 0, 0)) == pytest.approx(11.0)


def test_hypervolume_ignores_points_not_dominating_the_reference():
    front = [(1, 3), (2, 2), (3, 1)]
    # (-1, 5) is below the reference in x; (4, 0) only ties it in y: both bound no volume
    assert hypervolume([*front, (-1, 5), (4, 0)], ref=(0, 0)) == pytest.approx(6.0)
    assert hypervolume([(-1, 5), (4, 0)], ref=(0, 0)) == 0.0
    assert hypervolume(np.empty((0, 2)), ref=(0, 0)) == 0.0


def test_hypervolume_validates_shapes():
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        hypervolume([(1, 2)], ref=(0, 0, 0))
    with pytest.raises(ValueError, match="ref"):
        hypervolume([(1, 2)], ref=[[0, 0]])
    with pytest.raises(ValueError, match="finite"):
        hypervolume([(1, float("nan"))], ref=(0, 0))


# ------------------------------------------------------------------------------------------- front_summaries/render


def _row(method, metrics, preference=None, kind="method", params=None, seed=0, status="ok", primary=None,
         modelpool="mp", taskpool="tp"):
    metrics = {t: v if isinstance(v, dict) else {"accuracy": v} for t, v in metrics.items()}
    return CellResult(kind=kind, method=method, params=params if params is not None else {"scaling_factor": 0.3},
                      modelpool=modelpool, taskpool=taskpool, seed=seed, preference=preference, metrics=metrics,
                      primary_metrics=primary or {}, status=status)


def _ta_rows(params=None):
    return [
        _row("ta", {"a": 0.9, "b": 0.5}, [1.0, 0.0], params=params),
        _row("ta", {"a": 0.7, "b": 0.7}, [0.5, 0.5], params=params),
        _row("ta", {"a": 0.6, "b": 0.6}, [0.0, 1.0], params=params),  # dominated by (0.7, 0.7)
    ]


def _references():
    return [_row("pretrained", {"a": 0.5, "b": 0.4}, kind="reference", params={}),
            _row("individual", {"a": 0.95, "b": 0.95}, kind="reference", params={})]


def test_front_summaries_with_pretrained_reference():
    failed = _row("ta", {}, [0.25, 0.75], status="failed")
    (s,) = front_summaries([*_references(), *_ta_rows(), failed])
    assert (s.method, s.tasks, s.points, s.non_dominated, s.reference) == ("ta", ["a", "b"], 3, 2, "pretrained")
    # above ref (0.5, 0.4): boxes 0.4*0.1 = 0.04 and 0.2*0.3 = 0.06, overlapping in 0.2*0.1 = 0.02 -> 0.08
    assert s.hypervolume == pytest.approx(0.08)
    assert s.preferences == [[1.0, 0.0], [0.5, 0.5]]
    assert s.front == [[0.9, 0.5], [0.7, 0.7]]


def test_front_summaries_zero_reference_without_pretrained_row():
    (s,) = front_summaries(_ta_rows())
    assert s.reference == "zero"
    # above (0,0): 0.9*0.5 + 0.7*0.7 - 0.7*0.5 = 0.45 + 0.49 - 0.35 = 0.59
    assert s.hypervolume == pytest.approx(0.59)


def test_front_summaries_groups_by_params_and_seed():
    rows = [*_ta_rows({"scaling_factor": 0.3, "k": 1}), *_ta_rows({"k": 1, "scaling_factor": 0.3})]  # same params
    rows += [_row("ta", {"a": 0.8, "b": 0.8}, [0.5, 0.5], params={"scaling_factor": 0.5})]
    rows += [_row("ta", {"a": 0.8, "b": 0.8}, [0.5, 0.5], seed=1)]
    summaries = front_summaries(rows)
    assert [(s.params, s.seed, s.points) for s in summaries] == [
        ({"scaling_factor": 0.3, "k": 1}, 0, 6), ({"scaling_factor": 0.5}, 0, 1), ({"scaling_factor": 0.3}, 1, 1)]


def test_lower_is_better_metric_is_negated():
    primary = {"b": {"metric": "loss", "higher_is_better": False}}
    rows = [_row("ta", {"a": 0.9, "b": {"accuracy": 0.1, "loss": 0.3}}, [1.0, 0.0], primary=primary),
            _row("ta", {"a": 0.8, "b": {"accuracy": 0.1, "loss": 0.2}}, [0.5, 0.5], primary=primary),
            # higher loss and lower accuracy than both others: dominated only once the loss is negated
            _row("ta", {"a": 0.7, "b": {"accuracy": 0.1, "loss": 0.4}}, [0.0, 1.0], primary=primary),
            _row("pretrained", {"a": 0.5, "b": {"accuracy": 0.1, "loss": 1.0}}, kind="reference", params={})]
    (s,) = front_summaries(rows)
    assert s.non_dominated == 2
    assert s.front == [[0.9, -0.3], [0.8, -0.2]]
    # ref (0.5, -1.0): boxes 0.4*0.7 = 0.28 and 0.3*0.8 = 0.24, overlap 0.3*0.7 = 0.21 -> 0.31
    assert s.hypervolume == pytest.approx(0.31)


def test_render_pareto_github():
    rows = [*_references(), *_ta_rows(), *_ta_rows({"scaling_factor": 0.5}), *_ta_rows({"scaling_factor": 0.7})[:1]]
    text = render_pareto(rows)
    lines = text.splitlines()
    assert lines[0] == "### mp on tp: Pareto fronts (reference: pretrained model)"
    best = next(i for i, line in enumerate(lines) if "ta (scaling_factor=0.3)" in line)
    other = next(i for i, line in enumerate(lines) if "ta (scaling_factor=0.5)" in line)
    assert best < other  # 0.08 before 0.04: sorted by hypervolume, descending
    assert "0.08" in lines[best] and "| 3 " in lines[best]
    assert "| 3 " in lines[other]


def test_render_pareto_lists_one_point_configurations_as_points():
    """A configuration run at one preference (or none) has no front: a one-point "front" with a hypervolume such as
    2.8e-15 said nothing. It is listed as a point, with its scores and the fronts that dominate it."""
    rows = [*_references(), *_ta_rows(),
            _row("ta", {"a": 0.85, "b": 0.5}, [1.0, 0.0], params={"scaling_factor": 0.5}),  # under (0.9, 0.5)
            _row("tsv", {"a": 0.8, "b": 0.8}, params={}),  # beyond the front: (0.7, 0.7) is below it in both
            _row("tsv", {"a": 0.6, "b": 0.5}, params={}, modelpool="mp2"),  # a pool with no front at all
            _row("tsv", {"a": 0.7, "b": 0.55}, params={}, modelpool="mp2", seed=1)]
    text = render_pareto(rows)
    fronts, points = text.split("Single points")
    assert "| ta (scaling_factor=0.3) | 3 " in fronts and "tsv" not in fronts and "scaling_factor=0.5" not in fronts
    points, no_front = points.split("### mp2")
    assert points.startswith(" (run at one preference or none): 2")
    table = _cells(points)
    assert table[0] == ["Method", "Preference", "a (%)", "b (%)", "Dominated by"]
    assert table[1:] == [["ta (scaling_factor=0.5)", "r=(1, 0)", "85.0", "50.0", "ta (scaling_factor=0.3)"],
                         ["tsv", "none", "80.0", "80.0", "none"]]
    assert no_front.strip() == ("on tp: no preference front, 2 single point(s) run at one preference or none "
                                "(`mergebench leaderboard` lists them)")
    assert "Hypervolume" not in no_front
    csv_rows = render_pareto(rows, fmt="csv").splitlines()  # data formats keep every configuration
    data = [r for r in csv_rows if r and not r.startswith("modelpool,")]
    assert len(data) == 3 + 2 and "mp,tp,tsv,1,1,0.12" in data  # (0.8 - 0.5) * (0.8 - 0.4)
    assert data[-2:] == ["mp2,tp,tsv (seed=1),1,1,0.385", "mp2,tp,tsv (seed=0),1,1,0.3"]  # 0.7 * 0.55, 0.6 * 0.5


def test_lower_is_better_points_show_the_metric_not_its_negation():
    primary = {"b": {"metric": "loss", "higher_is_better": False}}
    rows = [_row("ta", {"a": 0.9, "b": {"loss": 0.3}}, [1.0, 0.0], primary=primary),
            _row("ta", {"a": 0.8, "b": {"loss": 0.2}}, [0.5, 0.5], primary=primary),
            _row("one", {"a": 0.85, "b": {"loss": 0.25}}, primary=primary, params={})]
    assert _cells(render_pareto(rows).split("Single points")[1])[1] == ["one", "none", "85.0", "25.0", "none"]


def _cells(text):
    """The rows of the first github table in `text`, as lists of stripped cells."""
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|--")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_render_pareto_plain_label_and_json():
    text = render_pareto(_ta_rows())
    assert "| ta " in text and "scaling_factor" not in text  # one configuration: no parameters in the label
    data = json.loads(render_pareto(_ta_rows(), fmt="json"))
    assert data[0]["method"] == "ta" and data[0]["non_dominated"] == 2
    assert data[0]["hypervolume"] == pytest.approx(0.59) and data[0]["reference"] == "zero"
    with pytest.raises(ValueError, match="unknown format"):
        render_pareto(_ta_rows(), fmt="xml")
