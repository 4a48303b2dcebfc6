"""Preferences as a cell axis: parsing, validation before any work, the cell key, and fronts on the embedded pool."""

import json
import math
from fractions import Fraction

import pytest

from mergebench_core.cli import main
from mergebench_core.errors import ConfigError
from mergebench_core.preferences import vectors
from mergebench_core.preferences.vectors import (
    PreferenceRequest,
    from_config,
    largest_simplex,
    parse_simplex,
    parse_vector,
    simplex_grid,
    simplex_size,
    validate,
)
from mergebench_core.results.store import ResultStore, cell_key

POOL = "digits-mlp_TA8"
TWO = ["--tasks", "digits,rot90"]


def test_vectors_are_normalised_and_kept_as_given():
    pref = validate(parse_vector("3,1"), ["a", "b"])
    assert pref.given == (3.0, 1.0) and pref.normalized == (0.75, 0.25)


def test_simplex_request_expands_over_the_tasks_without_duplicates():
    request = PreferenceRequest(vectors=((1.0, 1.0),), simplex=(3,))
    prefs = request.expand(["a", "b"])
    assert [p.normalized for p in prefs] == [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)]
    assert len(PreferenceRequest(simplex=(5,)).expand(["a", "b", "c"])) == 15


@pytest.mark.parametrize("text, message", [
    ("0.5,x", "'x' is not a number"),
    ("", "'' is not a number"),
])
def test_non_numbers_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_vector(text)


@pytest.mark.parametrize("vector, message", [
    ((0.5, 0.3, 0.2), "has 3 weight\\(s\\), but the pool has 2 task\\(s\\), in this order: digits, rot90"),
    ((-0.1, 1.1), "negative weight"),
    ((0.0, 0.0), "all zeros"),
    ((float("nan"), 1.0), "not a finite number"),
])
def test_malformed_vectors_are_refused(vector, message):
    with pytest.raises(ConfigError, match=message):
        validate(vector, ["digits", "rot90"])


@pytest.mark.parametrize("text", ["simplex:1", "simplex:x", "grid:3", "simplex", "simplex:²", "simplex:" + "9" * 5000])
def test_malformed_grids_are_refused(text):
    with pytest.raises(ConfigError, match="simplex:K with K ≥ 2"):
        parse_simplex(text)


def test_config_preferences_take_vectors_and_grids():
    request = from_config([[0.7, 0.3], "0.2,0.8", "simplex:2"])
    assert request.vectors == ((0.7, 0.3), (0.2, 0.8)) and request.simplex == (2,)
    with pytest.raises(ConfigError):
        from_config({"a": 1})


@pytest.mark.parametrize(("tasks", "k"), [(1, 2), (2, 5), (3, 5), (4, 9), (8, 3)])
def test_a_grid_is_counted_without_being_made(tasks, k):
    assert simplex_size(tasks, k) == len(simplex_grid(tasks, k)) == math.comb(k - 1 + tasks - 1, tasks - 1)


def test_a_grid_over_the_cap_is_refused_before_any_vector_is_made(monkeypatch):
    def never(*_args):
        raise AssertionError("the grid was generated")

    monkeypatch.setattr(vectors, "simplex_grid", never)
    with pytest.raises(ConfigError) as refused:
        PreferenceRequest(simplex=(1000,)).expand([f"t{i}" for i in range(8)])
    message = str(refused.value)
    assert f"name {math.comb(1006, 7):,} vectors" in message and "simplex:1000 gives" in message
    assert "more than the cap of 10,000" in message and "MERGEBENCH_MAX_PREFERENCES" in message
    assert "the largest grid that fits is simplex:9 (6,435 vectors)" in message  # C(15, 7); simplex:10 is 11,440


def test_the_cap_counts_every_vector_and_an_environment_variable_moves_it(monkeypatch):
    three = ["a", "b", "c"]
    assert largest_simplex(3, 10) == 4 and largest_simplex(3, 15) == 5 and largest_simplex(30, 10) is None
    monkeypatch.setenv("MERGEBENCH_MAX_PREFERENCES", "15")
    assert len(PreferenceRequest(simplex=(5,)).expand(three)) == 15
    with pytest.raises(ConfigError, match=r"name 16 vectors .*1 vector\(s\) given one by one.*simplex:4 \(10 vectors"):
        PreferenceRequest(vectors=((1.0, 1.0, 1.0),), simplex=(5,)).expand(three)
    monkeypatch.setenv("MERGEBENCH_MAX_PREFERENCES", "lots")
    with pytest.raises(ConfigError, match="MERGEBENCH_MAX_PREFERENCES='lots' is not a whole number"):
        PreferenceRequest(simplex=(2,)).expand(three)


def test_the_cell_key_changes_with_the_preference():
    def key(pref):
        return cell_key("method", "pa_task_arithmetic", {"scaling_factor": 0.3}, POOL, "digits_TA8", 0, None, pref)

    assert key([0.5, 0.5]) != key([0.25, 0.75]) != key(None)
    assert key([0.5, 0.5]) == key([0.5, 0.5])


@pytest.mark.parametrize("argv, message", [
    ([*TWO, "--preference", "0.5,0.3,0.2"], "in this order: digits, rot90"),
    ([*TWO, "--preference=-1,2"], "negative weight"),
    ([*TWO, "--preference", "0,0"], "all zeros"),
    ([*TWO, "--preference", "a,b"], "is not a number"),
    ([*TWO, "--preferences", "simplex:1"], "simplex:K"),
    (["--preferences", "simplex:1000"], "the preferences over 8 task(s) name 202,614,233,457,493,000 vectors"),
    (["--tasks", "digits,rot900"], "no task 'rot900'. Did you mean 'rot90'"),
    (["--tasks", "digits,digits"], "names a task twice"),
])
def test_bad_input_exits_2_and_writes_nothing(cli_env, capsys, argv, message):
    assert main(["run", "-m", "pa_task_arithmetic", "-p", POOL, *argv]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (cli_env / "results.sqlite").exists()


def test_a_two_task_front_on_the_embedded_pool(cli_env, capsys):
    argv = ["run", "-m", "pa_task_arithmetic,task_arithmetic", "-p", POOL, *TWO, "--preferences", "simplex:5"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "ignore them and ran once per pool" in captured.err  # task_arithmetic ignores preferences: a note
    rows = ResultStore(cli_env / "results.sqlite").all()
    pa = sorted((r for r in rows if r.method == "pa_task_arithmetic"), key=lambda r: r.preference)
    assert [r.preference for r in pa] == [[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1.0, 0.0]]
    assert all(r.modelpool == f"{POOL}[digits,rot90]" and list(r.metrics) == ["digits", "rot90"] for r in pa)
    assert pa[2].config["preference_given"] == [0.5, 0.5]
    ta = next(r for r in rows if r.method == "task_arithmetic")
    assert ta.preference is None and pa[2].metrics == ta.metrics  # uniform preference = task arithmetic
    # more weight on a task helps that task: the front is ordered along the preference
    digits = [r.metrics["digits"]["accuracy"] for r in pa]
    assert digits == sorted(digits) and digits[0] < digits[-1]
    assert "r=(0.25, 0.75)" in captured.out

    assert main(["leaderboard", "--pareto"]) == 0
    out = capsys.readouterr().out
    assert "Pareto fronts (reference: pretrained model)" in out and "| pa_task_arithmetic" in out
    assert main(["leaderboard", "--pareto", "--format", "json"]) == 0
    fronts = {f["method"]: f for f in json.loads(capsys.readouterr().out)}
    assert fronts["pa_task_arithmetic"]["points"] == 5
    assert fronts["pa_task_arithmetic"]["hypervolume"] > fronts["task_arithmetic"]["hypervolume"] > 0


# ----------------------------------------------------------------------------------------------------- simplex_grid


def test_simplex_grid_two_tasks_order_and_values():
    assert simplex_grid(2, 5) == [(1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]


def test_simplex_grid_three_tasks_order():
    assert simplex_grid(3, 3) == [(1.0, 0.0, 0.0), (0.5, 0.5, 0.0), (0.5, 0.0, 0.5), (0.0, 1.0, 0.0),
                                  (0.0, 0.5, 0.5), (0.0, 0.0, 1.0)]


@pytest.mark.parametrize(("m", "k", "count"), [(2, 5, 5), (3, 5, 15), (3, 2, 3), (4, 4, 20), (1, 3, 1)])
def test_simplex_grid_counts_and_vertices(m, k, count):
    grid = simplex_grid(m, k)
    assert len(grid) == count == math.comb(k - 1 + m - 1, m - 1)
    assert len(set(grid)) == count
    for i in range(m):
        assert tuple(1.0 if j == i else 0.0 for j in range(m)) in grid
    assert grid[0] == tuple(1.0 if j == 0 else 0.0 for j in range(m))


@pytest.mark.parametrize(("m", "k"), [(2, 5), (3, 5), (4, 9), (3, 17)])
def test_simplex_grid_sums_to_one_exactly(m, k):
    for vec in simplex_grid(m, k):
        assert all(v >= 0 for v in vec)
        assert sum(Fraction(v) for v in vec) == 1  # exact: K-1 is a power of two here


def test_simplex_grid_entries_are_exact_fractions():
    values = {v for vec in simplex_grid(3, 11) for v in vec}
    assert values == {i / 10 for i in range(11)}
    assert all(sum(vec) == pytest.approx(1.0, abs=1e-12) for vec in simplex_grid(3, 11))


def test_simplex_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="points_per_edge"):
        simplex_grid(3, 1)
    with pytest.raises(ValueError, match="num_tasks"):
        simplex_grid(0, 5)


def test_simplex_grid_is_still_found_where_it_was():
    """The grid moved from `pareto` to `vectors`; code that imported it from `pareto` or from the old flat
    `mergebench_core.preferences` module gets the same function."""
    import mergebench_core.preferences as package
    from mergebench_core.preferences import pareto

    assert pareto.simplex_grid is simplex_grid and package.simplex_grid is simplex_grid
