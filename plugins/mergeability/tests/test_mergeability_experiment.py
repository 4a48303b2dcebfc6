"""The mergeability experiment: its statistics against known answers, its plan, its features, and the command end to
end on a few experts of the embedded pool (resuming from the store), with its bad inputs. The command comes from this
plugin's `register_commands` hook and runs through the core's `main`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mergebench_core import PRETRAINED
from mergebench_core.cli import main
from mergebench_core.errors import ConfigError
from mergebench_core.results.store import ResultStore
from mergebench_mergeability.experiment import RECIPES, draw_partners, parse_recipes
from mergebench_mergeability.features import (
    FEATURES,
    average_state,
    gradient_distance,
    task_gradients,
    task_vector_gram,
    weight_features,
)
from mergebench_mergeability.statistics import paired_interval, standardized_regression, student_t_quantile


# -- statistics ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("df, expected", [(1, 12.706204736), (2, 4.302652730), (5, 2.570581836),
                                          (10, 2.228138852), (30, 2.042272456), (200, 1.971896224)])
def test_student_t_quantiles(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, rel=1e-6)


def test_paired_interval_is_the_t_interval():
    d = [0.1, 0.3, 0.2, 0.4]
    p = paired_interval(d)
    half = 3.182446305 * np.std(d, ddof=1) / 2
    assert (p.mean, p.n) == (pytest.approx(0.25), 4)
    assert (p.low, p.high) == (pytest.approx(0.25 - half, rel=1e-6), pytest.approx(0.25 + half, rel=1e-6))
    assert math.isnan(paired_interval([0.2]).low) and paired_interval([]).n == 0


def test_the_paired_interval_shrinks_with_more_seeds():
    """Simulated draws: a true difference of 1 point, an effect per expert and noise per (expert, seed)."""
    rng = np.random.default_rng(0)
    experts, truth = 8, 0.01
    effect = rng.normal(0, 0.005, experts)
    widths = []
    for seeds in (2, 5, 20, 80):
        d = [truth + effect[e] + rng.normal(0, 0.02) for e in range(experts) for _ in range(seeds)]
        p = paired_interval(d)
        widths.append(p.high - p.low)
        assert p.low < truth < p.high
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 4


def test_regression_recovers_planted_standardized_coefficients():
    rng = np.random.default_rng(1)
    n = 20000
    cov = np.array([[1.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 0.5]])
    x = rng.multivariate_normal([3.0, -1.0, 0.0], cov, size=n)
    beta = np.array([-0.8, 0.4, 1.5])
    noise = 0.7
    y = 2.0 + x @ beta + rng.normal(0, noise, n)
    var_y = beta @ cov @ beta + noise ** 2
    planted = beta * np.sqrt(np.diag(cov)) / math.sqrt(var_y)
    reg = standardized_regression(x, y, ["a", "b", "c"], bootstrap=400, seed=0)
    np.testing.assert_allclose(reg.coefficients, planted, atol=0.015)
    for (lo, hi), truth in zip(reg.intervals, planted):
        assert lo < truth < hi and hi - lo < 0.04
    assert reg.r2 == pytest.approx(beta @ cov @ beta / var_y, abs=0.01)
    # the same numbers as ordinary least squares on the raw data, rescaled by the standard deviations
    design = np.column_stack([np.ones(n), x])
    raw, *_ = np.linalg.lstsq(design, y, rcond=None)
    np.testing.assert_allclose(reg.coefficients, raw[1:] * x.std(axis=0) / y.std(), rtol=1e-9)
    corr = np.corrcoef(x, rowvar=False)
    np.testing.assert_allclose(reg.vif, np.diag(np.linalg.inv(corr)), rtol=1e-9)


def test_regression_refuses_too_few_groups_and_constant_features():
    with pytest.raises(Exception, match="at least"):
        standardized_regression(np.ones((3, 2)), np.arange(3.0), ["a", "b"])
    x = np.column_stack([np.arange(10.0), np.ones(10)])
    with pytest.raises(Exception, match="b does not vary"):
        standardized_regression(x, np.arange(10.0) ** 2, ["a", "b"])


# -- the plan ------------------------------------------------------------------------------------------------------
def test_recipes_take_the_guides_suffix_names_and_aliases():
    assert parse_recipes(None) == list(RECIPES)
    assert parse_recipes(["R2+R3", "none", "r3"]) == ["moderate_update_grad_magnitude", "baseline", "grad_magnitude"]
    with pytest.raises(ConfigError, match="unknown recipe 'r4'"):
        parse_recipes(["r4"])


def test_partners_are_seeded_distinct_and_exclude_the_expert():
    experts = [f"t{i}" for i in range(8)]
    a = draw_partners(experts, "t3", 3, seed=0)
    assert a == draw_partners(experts, "t3", 3, seed=0)
    assert len(set(a)) == 3 and "t3" not in a
    assert any(draw_partners(experts, "t3", 3, seed=s) != a for s in range(1, 5))
    with pytest.raises(ConfigError, match="between 1 and 7"):
        draw_partners(experts, "t3", 8, seed=0)


# -- features ------------------------------------------------------------------------------------------------------
def test_weight_features_from_the_gram_matrix():
    taus = np.array([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0], [3.0, 4.0, 0.0]])
    gram = (taus @ taus.T).tolist()
    f = weight_features(gram, [0, 1])
    assert f == {"weight_l2_distance": pytest.approx(5.0), "tau_cosine": pytest.approx(0.0),
                 "tau_norm": pytest.approx(3.5)}
    f = weight_features(gram, [0, 1, 2])
    assert f["weight_l2_distance"] == pytest.approx((5 + 4 + 3) / 3)
    assert f["tau_cosine"] == pytest.approx((0 + 3 / 5 + 4 / 5) / 3)
    assert f["tau_norm"] == pytest.approx(4.0)


def test_gram_average_point_and_gradients_on_the_embedded_pool(digits_pools):
    pool, taskpool = digits_pools
    experts = ["digits", "rot90", "parity"]
    gram = np.asarray(task_vector_gram(pool, experts))
    base = pool.state_dict(PRETRAINED)
    flat = {e: torch.cat([(v.double() - base[k].double()).reshape(-1) for k, v in pool.state_dict(e).items()])
            for e in experts}
    np.testing.assert_allclose(gram[0, 1], float(flat["digits"] @ flat["rot90"]), rtol=1e-9)
    np.testing.assert_allclose(gram[2, 2], float(flat["parity"] @ flat["parity"]), rtol=1e-9)

    avg = average_state(pool, experts)
    for k, v in base.items():
        expected = v + sum(pool.state_dict(e)[k] - v for e in experts) / 3
        torch.testing.assert_close(avg[k], expected, rtol=1e-5, atol=1e-6)

    model = pool.load_model(PRETRAINED)
    model.load_state_dict(avg)
    grads = task_gradients(model, taskpool, experts, examples=100, device=torch.device("cpu"), batch_size=32)
    # the definition: the gradient of the mean cross-entropy over the first 100 train examples, in one batch
    x, y = next(iter(taskpool.batches("rot90", "train", batch_size=100)))
    model.zero_grad()
    F.cross_entropy(taskpool.logits(model, "rot90", x), y).backward()
    for got, p in zip(grads["rot90"], model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-7)
    pairs = [("digits", "rot90"), ("digits", "parity"), ("rot90", "parity")]
    expected = np.mean([math.sqrt(sum(float((a - b).double().pow(2).sum()) for a, b in zip(grads[s], grads[t])))
                        for s, t in pairs])
    assert gradient_distance(grads, experts) == pytest.approx(expected)


# -- the command ---------------------------------------------------------------------------------------------------
@pytest.fixture()
def experiment_env(cli_env, session_cache, monkeypatch):
    """The session's built digits pool, with a trained-model and feature cache of this test's own."""
    cache = cli_env / "cache"
    (cache / "pools").mkdir(parents=True)
    (cache / "pools" / "digits").symlink_to(session_cache / "pools" / "digits")
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))
    return cli_env


SMALL = ["mergeability", "--tasks", "digits,rot90,mirror", "--partners", "1", "--seed", "0,1",
         "--method", "task_arithmetic,ties", "mergeability.steps=10", "mergeability.lambda_moderate_update=5"]


def test_the_experiment_runs_resumes_and_is_traceable(experiment_env, capsys):
    out = experiment_env / "out.json"
    argv = [*SMALL, "--analyze", "--features", "weight_l2_distance,gradient_l2_distance", "--bootstrap", "100",
            "--json", str(out), "--plot", str(experiment_env / "coef.svg")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "### Recipes" in printed and "### Validation" in printed and "### Stability" in printed
    result = json.loads(out.read_text())
    draws = result["draws"]
    assert len(draws) == 3 * 2 and all(len(d["group"]) == 2 and d["focal"] in d["group"] for d in draws)
    groups = {tuple(d["group"]) for d in draws}
    assert result["cells"] == 4 * len(groups) * 2 and result["reused"] == 0 and not result["failed"]
    # every outcome is a stored cell on the recipe's derived pool restricted to the group
    rows = {r.cell_key: r for r in ResultStore(experiment_env / "results.sqlite").all()}
    for o in result["outcomes"]:
        cell = rows[o["cell_key"]]
        assert cell.method == o["method"] and cell.mean == o["accuracy"]
        assert cell.modelpool.endswith(f"[{','.join(o['group'])}]") and "+mergeability" in cell.modelpool
    recipes = result["recipes"]
    assert recipes["moderate_update"]["pool"] == \
        "digits-mlp_TA8+mergeability(steps=10,enable_moderate_update=true,lambda_moderate_update=5.0)"
    assert recipes["baseline"]["pool"] == "digits-mlp_TA8+mergeability(steps=10)"  # λ₂ only where R2 is on
    assert recipes["moderate_update"]["suffix"] == "_moderate_update" and recipes["baseline"]["suffix"] == ""
    assert recipes["moderate_update"]["tau_norm"] < recipes["baseline"]["tau_norm"]  # R2 shrinks τ
    assert all(r["trained_now"] == 3 for r in recipes.values())
    by = {(c["recipe"], c["method"]): c for c in result["comparison"]}
    assert by[("baseline", "ties")]["delta_normalized"] is None
    assert by[("grad_magnitude", "all methods")]["delta_normalized"]["n"] == len(draws)
    assert set(result["regressions"]) == {"task_arithmetic", "ties"}
    assert result["regressions"]["ties"]["features"] == ["weight_l2_distance", "gradient_l2_distance"]
    assert set(next(iter(result["features"]["baseline"].values()))) == set(FEATURES)
    assert (experiment_env / "coef.svg").read_text().startswith("<?xml")

    # a rerun trains nothing, merges nothing and prints the same validation table
    out2 = experiment_env / "out2.json"
    assert main([*SMALL, "--json", str(out2)]) == 0
    again = json.loads(out2.read_text())
    assert again["reused"] == again["cells"] and all(r["trained_now"] == 0 for r in again["recipes"].values())
    assert again["comparison"] == result["comparison"]


@pytest.mark.parametrize("extra, message", [
    (["--recipes", "baseline,r4"], "unknown recipe 'r4'"),
    (["--tasks", "digits,rot9"], "has no task 'rot9'"),
    (["mergeability.lambda_moderate_update=-0.1"], "lambda_moderate_update must be a finite number >= 0"),
    (["mergeability.lambda_grad_magnitude=-1"], "lambda_grad_magnitude must be a finite number >= 0"),
    (["--modelpool", "digits-mlp_seeds"], "has no pretrained model"),
    (["--partners", "3"], "--partners must be between 1 and 2"),
    (["mergeability.enable_grad_magnitude=true"], "set by each recipe"),
    (["--preset", "imagenet"], "has no preset 'imagenet'"),
    (["--method", "tiess"], "unknown method 'tiess'"),
    (["ties.k=0.1,0.2"], "one configuration per merge method"),
    (["--recipes", "baseline", "--seed", "0", "--analyze"], "needs at least 6 merged groups"),
])
def test_bad_input_exits_2_with_one_message_and_writes_nothing(experiment_env, capsys, extra, message):
    argv = ["mergeability", "--tasks", "digits,rot90,mirror", "--partners", "1", "--method", "ties",
            "mergeability.steps=2"]
    if extra[0] == "--tasks":
        argv = ["mergeability", "--partners", "1", "--method", "ties"]
    if extra[0] == "--partners":
        argv = ["mergeability", "--tasks", "digits,rot90,mirror", "--method", "ties"]
    if extra[0] == "--method":
        argv = ["mergeability", "--tasks", "digits,rot90,mirror", "--partners", "1"]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not (experiment_env / "results.sqlite").exists()
    assert not (experiment_env / "cache" / "trained").exists()
