"""Task metrics: Matthews and Spearman against scikit-learn and SciPy, the evaluation loop computing them over a
whole split, primary metrics in the runner's averages, and the leaderboard showing a task's primary metric."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.metrics import matthews_corrcoef as sk_mcc
from torch import nn

from mergebench_core import ACCURACY, MetricSpec, TaskPool
from mergebench_core.data.evaluation import evaluate, primary_metrics, primary_value
from mergebench_core.results.leaderboard import render
from mergebench_core.data.metrics import MATTHEWS, SPEARMAN, matthews_corrcoef, spearman
from mergebench_core.running.runner import normalized_mean, primary_mean
from mergebench_core.results.store import CellResult

# --- matthews_corrcoef ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes, n, seed", [(2, 50, 0), (2, 7, 1), (3, 60, 2), (5, 200, 3), (10, 31, 4)])
def test_matthews_equals_sklearn_on_argmax(classes, n, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    # bias the logits towards the labels so the correlation is far from zero (and not trivially equal to it)
    logits[torch.arange(n), labels] += 0.8
    expected = sk_mcc(labels.numpy(), logits.argmax(-1).numpy())
    assert matthews_corrcoef(logits, labels) == pytest.approx(expected, abs=1e-12)


def test_matthews_multiclass_with_a_class_never_predicted_and_one_never_true():
    # labels use classes 0..2, predictions 0,1,3: the confusion matrix must span both
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1])
    pred = torch.tensor([0, 1, 1, 3, 3, 0, 1, 0, 1])
    logits = F.one_hot(pred, 4).float()
    expected = sk_mcc(labels.numpy(), pred.numpy())
    assert expected != 0.0
    assert matthews_corrcoef(logits, labels) == pytest.approx(expected, abs=1e-12)


def test_matthews_hand_computed_2x2():
    # TP = 3, FN = 1, FP = 2, TN = 4
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    logits = F.one_hot(pred, 2).float() * 3.0 - 1.0
    expected = (3 * 4 - 2 * 1) / math.sqrt((3 + 2) * (3 + 1) * (4 + 2) * (4 + 1))  # 10 / sqrt(600)
    assert matthews_corrcoef(logits, labels) == pytest.approx(expected, abs=1e-12)
    assert matthews_corrcoef(logits, labels) == pytest.approx(0.408248290463863, abs=1e-12)
    # perfect and inverted predictions
    assert matthews_corrcoef(F.one_hot(labels, 2).float(), labels) == pytest.approx(1.0)
    assert matthews_corrcoef(F.one_hot(1 - labels, 2).float(), labels) == pytest.approx(-1.0)


def test_matthews_is_zero_for_a_constant_prediction():
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 1])
    logits = torch.zeros(7, 3)
    logits[:, 1] = 5.0  # always class 1
    assert matthews_corrcoef(logits, labels) == 0.0
    assert sk_mcc(labels.numpy(), logits.argmax(-1).numpy()) == 0.0
    # and for constant labels
    assert matthews_corrcoef(torch.randn(7, 3, generator=torch.Generator().manual_seed(0)),
                             torch.ones(7, dtype=torch.long)) == 0.0


# --- spearman ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_equals_scipy_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    # few distinct values on both sides: many ties
    logits = torch.randint(0, 6, (n,), generator=g).double() / 2
    labels = (logits + torch.randint(0, 4, (n,), generator=g).double()).round()
    assert len(torch.unique(logits)) < n and len(torch.unique(labels)) < n
    expected = spearmanr(logits.numpy(), labels.numpy())[0]
    assert spearman(logits, labels) == pytest.approx(expected, abs=1e-12)


def test_spearman_with_n_by_1_logits():
    g = torch.Generator().manual_seed(7)
    labels = torch.rand(30, generator=g) * 5
    labels[:6] = labels[6:12]  # ties in the labels
    logits = (labels + torch.randn(30, generator=g)).unsqueeze(1)
    logits[3, 0] = logits[4, 0]  # and in the outputs
    assert logits.shape == (30, 1)
    expected = spearmanr(logits[:, 0].numpy(), labels.numpy())[0]
    assert spearman(logits, labels) == pytest.approx(expected, abs=1e-12)


def test_spearman_hand_computed():
    # ranks of x: [1, 2.5, 2.5, 4]; ranks of y: [2, 1, 3, 4]
    x, y = torch.tensor([1.0, 2.0, 2.0, 7.0]), torch.tensor([0.5, 0.1, 0.9, 3.0])
    # centred: a = [-1.5, 0, 0, 1.5], b = [-0.5, -1.5, 0.5, 1.5]; a·b = 3, |a|² = 4.5, |b|² = 5
    expected = 3 / math.sqrt(4.5 * 5)
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    # monotone transforms give ±1
    assert spearman(torch.tensor([3.0, 1.0, 2.0]).exp(), torch.tensor([30.0, 10.0, 20.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([-30.0, -10.0, -20.0])) == pytest.approx(-1.0)


# --- evaluate ------------------------------------------------------------------------------------------------------


class MetricTaskPool(TaskPool):
    """Inputs are the logits themselves (the model is nn.Identity): one classification task scored by Matthews
    correlation then accuracy, one plain accuracy task, one regression task with float targets scored by Spearman."""

    name = "metric-pool"

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        n = 30
        self.labels = {"cola": torch.randint(0, 2, (n,), generator=g),
                       "plain": torch.randint(0, 3, (n,), generator=g),
                       "stsb": torch.rand(n, generator=g) * 5}
        # sort the classification labels so some batches hold a single class: per-batch MCC differs from whole
        self.labels["cola"] = self.labels["cola"].sort().values
        cola = torch.randn(n, 2, generator=g)
        cola[torch.arange(n), self.labels["cola"]] += 0.7
        plain = torch.randn(n, 3, generator=g)
        stsb = (self.labels["stsb"] + 2 * torch.randn(n, generator=g)).unsqueeze(1)
        stsb[5] = stsb[6]  # a tie
        self.inputs = {"cola": cola, "plain": plain, "stsb": stsb}

    @property
    def tasks(self) -> list[str]:
        return ["cola", "plain", "stsb"]

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.inputs[task], self.labels[task]
        if limit is not None:
            x, y = x[:limit], y[:limit]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    def metrics(self, task: str):
        return {"cola": (MATTHEWS, ACCURACY), "plain": (ACCURACY,), "stsb": (SPEARMAN,)}[task]


def test_evaluate_reports_matthews_over_the_whole_split():
    pool = MetricTaskPool()
    batch_size = 8  # 30 examples: four batches, the last one short
    out = evaluate(pool, nn.Identity(), tasks=["cola"], batch_size=batch_size)
    row = out["cola"]
    x, y = pool.inputs["cola"], pool.labels["cola"]
    pred = x.argmax(-1)
    whole = sk_mcc(y.numpy(), pred.numpy())
    per_batch = [sk_mcc(y[i:i + batch_size].numpy(), pred[i:i + batch_size].numpy())
                 for i in range(0, len(y), batch_size)]
    # the test only discriminates if the whole-split MCC differs from any batch-wise aggregate
    assert abs(whole - sum(per_batch) / len(per_batch)) > 0.05
    assert abs(whole - per_batch[-1]) > 0.05
    assert row["matthews_corrcoef"] == pytest.approx(whole, abs=1e-9)
    assert row["accuracy"] == pytest.approx(float((pred == y).double().mean()))
    assert row["loss"] == pytest.approx(float(F.cross_entropy(x, y)), rel=1e-5)
    assert row["examples"] == 30.0


def test_evaluate_with_a_limit_scores_only_the_first_examples():
    pool = MetricTaskPool()
    out = evaluate(pool, nn.Identity(), tasks=["cola"], batch_size=4, limit=18)
    x, y = pool.inputs["cola"][:18], pool.labels["cola"][:18]
    assert out["cola"]["examples"] == 18.0
    assert out["cola"]["matthews_corrcoef"] == pytest.approx(sk_mcc(y.numpy(), x.argmax(-1).numpy()), abs=1e-9)


def test_evaluate_regression_task_reports_spearman_and_no_accuracy_or_loss():
    pool = MetricTaskPool()
    out = evaluate(pool, nn.Identity(), tasks=["stsb"], batch_size=7)
    row = out["stsb"]
    assert set(row) == {"examples", "spearman"}
    assert row["examples"] == 30.0
    expected = spearmanr(pool.inputs["stsb"][:, 0].numpy(), pool.labels["stsb"].numpy())[0]
    assert row["spearman"] == pytest.approx(expected, abs=1e-9)


def test_a_regression_task_without_a_declared_metric_gets_no_fake_accuracy():
    class Undeclared(MetricTaskPool):
        def metrics(self, task):
            return (ACCURACY,)

    assert evaluate(Undeclared(), nn.Identity(), tasks=["stsb"], batch_size=7)["stsb"] == {"examples": 30.0}


def test_evaluate_plain_accuracy_task_has_no_extra_metrics():
    pool = MetricTaskPool()
    out = evaluate(pool, nn.Identity(), batch_size=8)
    assert list(out) == ["cola", "plain", "stsb"]
    x, y = pool.inputs["plain"], pool.labels["plain"]
    assert set(out["plain"]) == {"examples", "accuracy", "loss"}
    assert out["plain"]["accuracy"] == pytest.approx(float((x.argmax(-1) == y).double().mean()))


def test_primary_metrics_are_the_first_spec_of_each_task():
    pool = MetricTaskPool()
    assert primary_metrics(pool, ["cola", "plain", "stsb"]) == {
        "cola": {"metric": "matthews_corrcoef", "higher_is_better": True},
        "plain": {"metric": "accuracy", "higher_is_better": True},
        "stsb": {"metric": "spearman", "higher_is_better": True},
    }

    class LowerFirst(MetricTaskPool):
        def metrics(self, task):
            return (MetricSpec("error", higher_is_better=False, compute=lambda z, y: 0.0), ACCURACY)

    assert primary_metrics(LowerFirst(), ["plain"]) == {"plain": {"metric": "error", "higher_is_better": False}}
    assert primary_metrics(pool, []) == {}


# --- the runner's averages -----------------------------------------------------------------------------------------

MERGED = {"cola": {"accuracy": 0.9, "matthews_corrcoef": 0.5},
          "sst2": {"accuracy": 0.8},
          "stsb": {"examples": 10.0, "spearman": 0.6}}
EXPERTS = {"cola": {"accuracy": 0.95, "matthews_corrcoef": 0.8},
           "sst2": {"accuracy": 1.0},
           "stsb": {"examples": 10.0, "spearman": 0.75}}
PRIMARY = {"cola": {"metric": "matthews_corrcoef", "higher_is_better": True},
           "sst2": {"metric": "accuracy", "higher_is_better": True},
           "stsb": {"metric": "spearman", "higher_is_better": True}}


def test_primary_value():
    assert primary_value(MERGED, PRIMARY, "cola") == 0.5
    assert primary_value(MERGED, {}, "cola") == 0.9  # accuracy when no primary metric is named
    assert primary_value(MERGED, PRIMARY, "stsb") == 0.6
    assert primary_value(MERGED, {}, "stsb") is None


def test_primary_mean_uses_each_tasks_primary_metric():
    assert primary_mean(MERGED, PRIMARY) == pytest.approx((0.5 + 0.8 + 0.6) / 3)
    # without primary metrics: accuracy, and the regression task (no accuracy) is left out
    assert primary_mean(MERGED, {}) == pytest.approx((0.9 + 0.8) / 2)
    assert primary_mean({}, PRIMARY) is None


def test_normalized_mean_uses_each_tasks_primary_metric():
    assert normalized_mean(MERGED, EXPERTS, PRIMARY) == pytest.approx((0.5 / 0.8 + 0.8 / 1.0 + 0.6 / 0.75) / 3)
    assert normalized_mean(MERGED, EXPERTS) == pytest.approx((0.9 / 0.95 + 0.8 / 1.0) / 2)
    # an expert scoring 0 on the primary metric gives no ratio for that task
    zero = {**EXPERTS, "cola": {"accuracy": 0.95, "matthews_corrcoef": 0.0}}
    assert normalized_mean(MERGED, zero, PRIMARY) == pytest.approx((0.8 / 1.0 + 0.6 / 0.75) / 2)


# --- the leaderboard -----------------------------------------------------------------------------------------------


def _cells(primary):
    common = dict(modelpool="glue-pool", taskpool="glue", primary_metrics=primary)
    return [
        CellResult(kind="reference", method="individual", params={}, **common,
                   metrics={"cola": {"accuracy": 0.861, "matthews_corrcoef": 0.6234},
                            "sst2": {"accuracy": 0.937}}, mean=0.7802),
        CellResult(kind="method", method="task_arithmetic", params={"scaling_factor": 0.3}, **common,
                   metrics={"cola": {"accuracy": 0.712, "matthews_corrcoef": 0.1489},
                            "sst2": {"accuracy": 0.884}}, mean=0.51645, normalized_mean=0.59),
    ]


def _row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{table}")


def test_leaderboard_shows_the_primary_metric_and_names_it():
    primary = {"cola": {"metric": "matthews_corrcoef", "higher_is_better": True},
               "sst2": {"metric": "accuracy", "higher_is_better": True}}
    text = render(_cells(primary))
    title = text.splitlines()[0]
    assert title.startswith("### glue-pool on glue (")
    assert "cola: matthews_corrcoef" in title
    assert "sst2" not in title
    header = [c.strip() for c in text.splitlines()[2].strip().strip("|").split("|")]
    assert header[:3] == ["Method", "cola", "sst2"]
    assert _row(text, "Individual (experts)")[1:4] == ["62.3", "93.7", "78.0"]
    assert _row(text, "task_arithmetic")[1:5] == ["14.9", "88.4", "51.6", "59.0"]
    assert "86.1" not in text and "71.2" not in text  # cola's accuracy is not what the table shows


def test_leaderboard_without_primary_metrics_shows_accuracy():
    text = render(_cells({}))
    assert text.splitlines()[0] == "### glue-pool on glue (accuracy, %)"
    assert _row(text, "Individual (experts)")[1:3] == ["86.1", "93.7"]
    assert _row(text, "task_arithmetic")[1:3] == ["71.2", "88.4"]
