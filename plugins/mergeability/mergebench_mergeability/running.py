"""Running the experiment: the recipes' derived pools built (and timed), every group merged by every method as a cell
of the results store, the recipes compared on the same draws, and with `analyze` the features and regressions."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mergebench_core import PRETRAINED, MergebenchError, TaskPool
from mergebench_core.data.evaluation import primary_value
from mergebench_core.results.store import CellResult
from mergebench_mergeability.cache import FeatureCache
from mergebench_mergeability.experiment import Draw, Experiment, Plan, plan_experiment
from mergebench_mergeability.features import (
    FEATURES,
    FEATURES_VERSION,
    average_state,
    gradient_distance,
    task_gradients,
    task_vector_gram,
    weight_features,
)
from mergebench_mergeability.statistics import Paired, Regression, paired_interval, standardized_regression

log = logging.getLogger(__name__)

ALL_METHODS = "all methods"
"""The comparison row that pairs the methods' mean outcome per draw."""


@dataclass
class RecipeSummary:
    recipe: str
    pool: str
    suffix: str
    train_seconds: float
    trained_now: int
    expert_accuracy: float | None
    """Mean over the experiment's experts of each one's accuracy on its own task (test split)."""
    experts: dict[str, dict[str, Any]]
    """Per expert, under the guide's name `{task}{suffix}`: its task, accuracy on its task and ‖τ‖₂."""
    tau_norm: float
    """Mean over the experiment's experts of ‖τ_t‖₂."""


@dataclass
class ComparisonRow:
    recipe: str
    method: str
    accuracy: float | None
    normalized: float | None
    n: int
    delta_accuracy: Paired | None = None
    delta_normalized: Paired | None = None


@dataclass
class Outcome:
    """One merged group's result: (recipe, group, method) → raw and normalized accuracy."""

    recipe: str
    group: tuple[str, ...]
    method: str
    accuracy: float | None
    normalized: float | None
    cell_key: str | None


@dataclass
class ExperimentResult:
    experiment: Experiment
    recipes: list[RecipeSummary]
    draws: list[Draw]
    outcomes: list[Outcome]
    comparison: list[ComparisonRow]
    failed: list[CellResult]
    cells: int
    reused: int
    features: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """recipe → group label → features (with --analyze)."""
    regressions: dict[str, Regression] = field(default_factory=dict)
    """method → regression (with --analyze)."""

    def to_json(self) -> dict[str, Any]:
        exp = self.experiment
        return {
            "modelpool": exp.modelpool, "tasks": exp.tasks, "methods": exp.methods, "partners": exp.partners,
            "seeds": exp.seeds, "trainer": exp.trainer,
            "recipes": {r.recipe: dataclasses.asdict(r) for r in self.recipes},
            "draws": [dataclasses.asdict(d) for d in self.draws],
            "outcomes": [dataclasses.asdict(o) for o in self.outcomes],
            "comparison": [dataclasses.asdict(c) for c in self.comparison],
            "features": self.features,
            "regressions": {m: dataclasses.asdict(r) for m, r in self.regressions.items()},
            "cells": self.cells, "reused": self.reused, "failed": [r.cell_key for r in self.failed],
        }


def _suffix(recipe: str) -> str:
    return "" if recipe == "baseline" else f"_{recipe}"


def compare(exp: Experiment, outcomes: Sequence[Outcome], draws: Sequence[Draw]) -> list[ComparisonRow]:
    """Per recipe and method (and over all methods): mean outcome over the draws and the paired difference to
    baseline on the same draws."""
    table = {(o.recipe, o.group, o.method): o for o in outcomes}

    def value(recipe: str, group: tuple[str, ...], method: str, attr: str) -> float | None:
        if method == ALL_METHODS:
            vals = [value(recipe, group, m, attr) for m in exp.methods]
            return None if any(v is None for v in vals) else float(np.mean(vals))  # type: ignore[arg-type]
        o = table.get((recipe, group, method))
        return getattr(o, attr) if o is not None else None

    rows = []
    for recipe in exp.recipes:
        for method in [*exp.methods, ALL_METHODS]:
            acc = [value(recipe, d.group, method, "accuracy") for d in draws]
            norm = [value(recipe, d.group, method, "normalized") for d in draws]
            row = ComparisonRow(recipe, method, _mean(acc), _mean(norm), sum(v is not None for v in norm))
            if recipe != "baseline" and "baseline" in exp.recipes:
                for attr, target in (("accuracy", "delta_accuracy"), ("normalized", "delta_normalized")):
                    diffs = []
                    for d in draws:
                        mine, base = value(recipe, d.group, method, attr), value("baseline", d.group, method, attr)
                        if mine is not None and base is not None:
                            diffs.append(mine - base)
                    setattr(row, target, paired_interval(diffs))
            rows.append(row)
    return rows


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def run_experiment(exp: Experiment, runner: Any, plan: Plan | None = None, *, analyze: bool = False,
                   grad_examples: int = 256, bootstrap: int = 2000, features: Sequence[str] = FEATURES,
                   features_cache: FeatureCache | None = None) -> ExperimentResult:
    """Builds the recipes' derived pools (timed), merges every group with every method as cells of the runner's
    store, compares recipes, and with `analyze` computes the groups' features and the regressions."""
    plan = plan or plan_experiment(exp, runner)
    draws, selections, cells = plan.draws, plan.selections, plan.cells
    if runner.store is None:
        raise MergebenchError("the runner has no results store")
    features_cache = features_cache or FeatureCache.default()

    summaries = []
    grams: dict[str, list[list[float]]] = {}
    for recipe in exp.recipes:
        derived = runner.modelpool(exp.pool_name(recipe))
        taskpool = runner.taskpool(runner.taskpool_for(exp.pool_name(recipe)))
        experts = [e for e in derived.expert_names if derived.task_of(e) in exp.tasks]
        missing = [e for e in experts if not derived.is_built(e)]
        log.info("recipe %s: %s (%d of %d experts to train)", recipe, exp.pool_name(recipe), len(missing),
                 len(experts))
        if missing:  # the base pool and the task data are read before the clock starts: the time is training
            runner.modelpool(exp.modelpool).state_dict(PRETRAINED)
            for e in missing:
                taskpool.num_examples(derived.task_of(e), "train")
        start = time.perf_counter()
        for e in experts:
            derived.tensor_source(e)  # trains and caches the expert when it is missing
        seconds = time.perf_counter() - start if missing else 0.0
        scope = exp.scope(recipe)
        refs = runner.references(scope, runner.taskpool_for(scope))
        individual = next((r for r in refs if r.method == "individual" and r.status == "ok"), None)
        accs = {t: primary_value(individual.metrics, individual.primary_metrics, t) for t in individual.metrics} \
            if individual is not None else {}
        key = {"what": "task_vector_gram", "pretrained": derived.identity(PRETRAINED),
               "experts": [derived.identity(e) for e in experts], "version": FEATURES_VERSION}
        grams[recipe] = features_cache.feature(key, lambda derived=derived, experts=experts:
                                               task_vector_gram(derived, experts))
        norms = [math.sqrt(max(grams[recipe][i][i], 0.0)) for i in range(len(experts))]
        per_expert = {f"{derived.task_of(e)}{_suffix(recipe)}": {"task": derived.task_of(e),
                                                                  "accuracy": accs.get(derived.task_of(e)),
                                                                  "tau_norm": norm}
                      for e, norm in zip(experts, norms)}
        summaries.append(RecipeSummary(recipe, exp.pool_name(recipe), _suffix(recipe), seconds, len(missing),
                                       individual.mean if individual is not None else None, per_expert,
                                       float(np.mean(norms))))

    report = runner.run(cells)
    by_cell = {(r.modelpool, r.method): r for r in report.results if r.kind == "method"}
    outcomes = []
    for (recipe, group), name in selections.items():
        for method in exp.methods:
            r = by_cell.get((name, method))
            ok = r is not None and r.status == "ok"
            outcomes.append(Outcome(recipe, group, method, r.mean if ok else None,  # type: ignore[union-attr]
                                    r.normalized_mean if ok else None, r.cell_key if r is not None else None))
    result = ExperimentResult(exp, summaries, draws, outcomes, compare(exp, outcomes, draws), report.failed,
                              len(cells), report.skipped)
    if analyze:
        analyze_groups(result, runner, grams, grad_examples=grad_examples, bootstrap=bootstrap,
                       features=features, features_cache=features_cache)
    return result


def group_label(group: Sequence[str]) -> str:
    return ",".join(group)


def analyze_groups(result: ExperimentResult, runner: Any, grams: Mapping[str, list[list[float]]], *,
                   grad_examples: int, bootstrap: int, features: Sequence[str] = FEATURES,
                   features_cache: FeatureCache) -> None:
    """Features of every distinct merged group (all of FEATURES), and per method the standardised regression of
    normalized accuracy on `features`."""
    exp = result.experiment
    groups = list(dict.fromkeys(d.group for d in result.draws))
    for recipe in exp.recipes:
        derived = runner.modelpool(exp.pool_name(recipe))
        experts = [e for e in derived.expert_names if derived.task_of(e) in exp.tasks]
        index = {derived.task_of(e): i for i, e in enumerate(experts)}
        expert_of = {derived.task_of(e): e for e in experts}
        taskpool = runner.taskpool(runner.taskpool_for(exp.pool_name(recipe)))
        feats = result.features.setdefault(recipe, {})
        for group in groups:
            members = [expert_of[t] for t in group]
            row = weight_features(grams[recipe], [index[t] for t in group])

            def compute(members: list[str] = members, group: tuple[str, ...] = group, derived: Any = derived,
                        taskpool: TaskPool = taskpool) -> float:
                model = derived.load_model(PRETRAINED)
                model.load_state_dict(average_state(derived, members))
                grads = task_gradients(model, taskpool, group, examples=grad_examples, device=runner.device,
                                       batch_size=runner.options.batch_size)
                return gradient_distance(grads, group)

            key = {"what": "gradient_l2_distance", "pretrained": derived.identity(PRETRAINED),
                   "members": [derived.identity(m) for m in members], "tasks": list(group),
                   "examples": grad_examples, "taskpool": taskpool.version_info(), "version": FEATURES_VERSION}
            row["gradient_l2_distance"] = features_cache.feature(key, compute)
            feats[group_label(group)] = {f: row[f] for f in FEATURES}
    for method in exp.methods:
        xs, ys = [], []
        for o in result.outcomes:
            if o.method == method and o.normalized is not None:
                f = result.features[o.recipe][group_label(o.group)]
                xs.append([f[name] for name in features])
                ys.append(o.normalized)
        result.regressions[method] = standardized_regression(xs, ys, features, bootstrap=bootstrap, seed=0)
