"""The mergeability experiment: do experts fine-tuned with mergeability regularisers merge better, and what about a
group of experts predicts how well it merges?

`mergebench mergeability` runs it in three steps, every merge an ordinary cell of the results store (so an
interrupted run resumes, and every number can be traced to its row with `mergebench show`):

1. **Recipes → derived pools.** Each recipe is a derived pool of the training method (`mergeability` by default):
   every expert re-fine-tuned from the pool's pretrained model under it. The recipes carry the mergeability guide's
   checkpoint suffixes (shared/seeds/000): `baseline` (no suffix: no regulariser), `moderate_update` (R2),
   `grad_magnitude` (R3) and `moderate_update_grad_magnitude` (R2+R3), switched on with the method's own parameters:
   `digits-mlp_TA8+mergeability(enable_moderate_update=true)` is the guide's `{task}_moderate_update` experts.
2. **Validation.** For every expert e and every partner seed s, K partners are drawn (seeded, uniformly without
   replacement from the other experts; the draw depends on e and s only, so every recipe meets the same partners).
   The group {e} ∪ partners, from one recipe's derived pool, is merged by each merge method: the cell
   `POOL+mergeability(...)[group tasks in pool order]` × method, scored on the group's tasks. Its outcome is the
   cell's mean accuracy (raw) and normalized accuracy (mean over the group's tasks of merged accuracy / the recipe's
   own expert's accuracy, as in every table). Per recipe and method the table gives the mean outcome over the E × S
   draws, and for each regularised recipe the **paired difference** to `baseline` on the same draws: the mean and a
   95 % Student-t interval over the E × S draws (groups overlap, so the draws are not independent and the interval
   is a guide, not a test). The row `all methods` pairs the methods' mean outcome per draw.
3. **Stability analysis** (`--analyze`). For every distinct merged group (recipe, tasks), with τ_t = θ_t − θ₀ over
   every floating-point tensor of the merged model and pairs over the group's unordered pairs {a, b}:
   - `weight_l2_distance`: mean over pairs of ‖θ_a − θ_b‖₂ (= ‖τ_a − τ_b‖₂);
   - `gradient_l2_distance`: mean over pairs of ‖g_a − g_b‖₂, where g_t = ∇_θ L_t(θ̄) is task t's gradient at the
     group's simple average θ̄ = θ₀ + (1/|G|) Σ_{t∈G} τ_t (the merge point that no method's parameters change),
     L_t the mean cross-entropy through task t's head over the first `--grad-examples` (256) examples of t's train
     split in the task pool's order, the model in evaluation mode, θ every parameter of the model;
   - `tau_cosine`: mean over pairs of cos(τ_a, τ_b);
   - `tau_norm`: mean over members of ‖τ_t‖₂.
   Per merge method, the group's normalized accuracy is regressed on the features, all standardised (z-scores), by
   least squares: standardised coefficients, percentile 95 % intervals from a bootstrap over groups (2,000
   resamples, seeded), R², and each feature's variance inflation factor (the features are related:
   ‖τ_a − τ_b‖² = ‖τ_a‖² + ‖τ_b‖² − 2‖τ_a‖‖τ_b‖cos, so read coefficients with their VIF). `--plot` draws the
   coefficients per method (matplotlib: `pip install 'mergebench[plot]'`).

Features are cached per (recipe experts, group, examples) in `$MERGEBENCH_CACHE/mergeability/`, keyed by the models'
identities (a derived expert's identity is its recipe hash), so a rerun recomputes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mergebench_core.contract.api import PRETRAINED, ModelPool, TaskPool
from mergebench_core.contract.config import Override, build_params, parse_overrides
from mergebench_core.errors import ConfigError, MergebenchError, normalize_name
from mergebench_core.data.evaluation import primary_value
from mergebench_core.paths import cache_dir, default_store
from mergebench_core.pools.views import PoolName, check_tasks
from mergebench_core.results.store import CellResult

log = logging.getLogger(__name__)

RECIPES: dict[str, tuple[bool, bool]] = {
    "baseline": (False, False),
    "moderate_update": (True, False),
    "grad_magnitude": (False, True),
    "moderate_update_grad_magnitude": (True, True),
}
"""Recipe name (the guide's checkpoint suffix, `baseline` for none) → (enable_moderate_update, enable_grad_magnitude)."""
ALIASES = {"none": "baseline", "r2": "moderate_update", "r3": "grad_magnitude", "r2+r3": "moderate_update_grad_magnitude",
           "r2_r3": "moderate_update_grad_magnitude"}
SWITCHES = ("enable_moderate_update", "enable_grad_magnitude")
DEPENDENT = {"lambda_moderate_update": "enable_moderate_update", "lambda_grad_magnitude": "enable_grad_magnitude",
             "grad_magnitude_every": "enable_grad_magnitude"}
"""Parameters that only matter when their switch is on: left out of a recipe's name (and cache key) otherwise."""
DEFAULT_METHODS = ("task_arithmetic", "ties", "tsv_m", "regmean")
DEFAULT_SEEDS = (0, 1, 2)
FEATURES = ("weight_l2_distance", "gradient_l2_distance", "tau_cosine", "tau_norm")
FEATURES_VERSION = 1
"""Bump when the features' definition changes: cached features are then recomputed."""
ALL_METHODS = "all methods"


# -- statistics -----------------------------------------------------------------------------------------------------
def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t with `df` degrees of freedom: the CDF (Simpson's rule on the
    density, in the variable u = atan(x/√df), where the integrand is smooth and bounded) inverted by bisection."""
    if not (0.5 < p < 1) or df <= 0:
        raise ValueError(f"need 0.5 < p < 1 and df > 0, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        # x = √df tan u, dx = √df sec²u du, (1 + x²/df) = sec²u: density·dx = c √df cos^(df-1)(u) du
        upper, n = math.atan(x / math.sqrt(df)), 2000
        h = upper / n
        total = 0.0
        for i in range(n + 1):
            w = 1 if i in (0, n) else (4 if i % 2 else 2)
            total += w * math.cos(i * h) ** (df - 1)
        return 0.5 + math.exp(log_c) * math.sqrt(df) * total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Paired:
    """A paired comparison: the mean of the differences and its Student-t interval."""

    mean: float
    low: float
    high: float
    n: int


def paired_interval(differences: Sequence[float], level: float = 0.95) -> Paired:
    """Mean of paired differences with the Student-t interval mean ± t_{(1+level)/2, n−1} · sd / √n (nan bounds
    for fewer than two differences)."""
    d = np.asarray([x for x in differences if x is not None and math.isfinite(x)], dtype=np.float64)
    n = len(d)
    if n == 0:
        return Paired(math.nan, math.nan, math.nan, 0)
    mean = float(d.mean())
    if n < 2:
        return Paired(mean, math.nan, math.nan, n)
    half = student_t_quantile((1 + level) / 2, n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
    return Paired(mean, mean - half, mean + half, n)


@dataclass
class Regression:
    """A standardised linear regression of an outcome on features."""

    features: list[str]
    coefficients: list[float]
    """Standardised coefficients: the outcome's change in standard deviations per standard deviation of a feature,
    the others held fixed."""
    intervals: list[tuple[float, float]]
    """Percentile bootstrap intervals of the coefficients."""
    r2: float
    n: int
    vif: list[float]
    """Variance inflation factors: 1 / (1 − R²) of each feature regressed on the others."""
    bootstrap: int
    level: float = 0.95


def _standardised_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float] | None:
    sx, sy = x.std(axis=0), y.std()
    if sy == 0 or np.any(sx == 0):
        return None
    z, zy = (x - x.mean(axis=0)) / sx, (y - y.mean()) / sy
    beta, *_ = np.linalg.lstsq(z, zy, rcond=None)
    residual = zy - z @ beta
    return beta, 1.0 - float(residual @ residual) / float(zy @ zy)


def standardized_regression(x: Any, y: Any, features: Sequence[str], *, bootstrap: int = 2000, seed: int = 0,
                            level: float = 0.95) -> Regression:
    """Least squares of z-scored `y` on z-scored columns of `x` (n × p), with percentile bootstrap intervals over
    rows (resamples where a column or y is constant are drawn again)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, p = x.shape
    if n < p + 2:
        raise MergebenchError(f"a regression on {p} features needs at least {p + 2} merged groups, got {n}")
    fit = _standardised_fit(x, y)
    if fit is None:
        constant = [f for f, s in zip(features, x.std(axis=0)) if s == 0] or ["the outcome"]
        raise MergebenchError(f"cannot standardise: {', '.join(constant)} does not vary over the {n} groups")
    beta, r2 = fit
    corr = np.corrcoef(x, rowvar=False).reshape(p, p)
    try:
        vif = [float(v) for v in np.diag(np.linalg.inv(corr))]
    except np.linalg.LinAlgError:
        vif = [math.inf] * p
    rng = np.random.default_rng(seed)
    draws, attempts = [], 0
    while len(draws) < bootstrap and attempts < 10 * bootstrap:
        attempts += 1
        rows = rng.integers(0, n, n)
        refit = _standardised_fit(x[rows], y[rows])
        if refit is not None:
            draws.append(refit[0])
    intervals = [(math.nan, math.nan)] * p
    if draws:
        stacked = np.stack(draws)
        tail = 100 * (1 - level) / 2
        lo, hi = np.percentile(stacked, tail, axis=0), np.percentile(stacked, 100 - tail, axis=0)
        intervals = [(float(a), float(b)) for a, b in zip(lo, hi)]
    return Regression(list(features), [float(b) for b in beta], intervals, r2, n, vif, len(draws), level)


# -- the plan -------------------------------------------------------------------------------------------------------
def parse_recipes(names: Sequence[str] | None) -> list[str]:
    if not names:
        return list(RECIPES)
    out = []
    for raw in names:
        name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if name not in RECIPES:
            raise ConfigError(f"unknown recipe {raw!r}; recipes: {', '.join(RECIPES)} "
                              f"(or R2, R3, R2+R3, none)")
        if name in out:
            raise ConfigError(f"--recipes names {name} twice")
        out.append(name)
    return out


def draw_partners(experts: Sequence[str], focal: str, k: int, seed: int) -> list[str]:
    """K partners of `focal` drawn without replacement from the other experts; depends only on (experts, focal, k,
    seed), never on a recipe, so every recipe is compared on the same groups."""
    from mergebench_core.training.loop import derive_seed

    others = [e for e in experts if e != focal]
    if not 1 <= k <= len(others):
        raise ConfigError(f"--partners must be between 1 and {len(others)} (the other experts), got {k}")
    return random.Random(derive_seed(seed, "mergeability-partners", focal)).sample(others, k)


@dataclass(frozen=True)
class Draw:
    focal: str
    seed: int
    group: tuple[str, ...]
    """The focal expert's task and its partners', in the pool's task order."""


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclass
class Experiment:
    """Everything that decides the experiment's cells."""

    modelpool: str
    tasks: list[str]
    """The experts taking part (focal and partners): the pool's tasks, or --tasks."""
    recipes: list[str]
    methods: list[str]
    partners: int
    seeds: list[int]
    trainer: str
    trainer_params: dict[str, Any]
    """Training parameters common to every recipe (a preset, then overrides), as values of the trainer's Params."""
    recipe_params: dict[str, Any] = field(default_factory=dict)
    """The trainer's Params instance per recipe."""
    all_tasks: bool = True
    """Whether every expert of the pool takes part."""

    def pool_name(self, recipe: str) -> str:
        """`POOL+TRAINER(non-default parameters)` for a recipe; switched-off terms' parameters are left out."""
        params = self.recipe_params[recipe]
        defaults = type(params)()
        items = []
        for f in dataclasses.fields(params):
            value = getattr(params, f.name)
            switch = DEPENDENT.get(f.name)
            if switch is not None and not getattr(params, switch, False):
                continue
            if value != getattr(defaults, f.name):
                items.append(f"{f.name}={_format_value(value)}")
        return f"{self.modelpool}+{self.trainer}" + (f"({','.join(items)})" if items else "")

    def scope(self, recipe: str) -> str:
        """The recipe's derived pool restricted to the experiment's experts (the pool itself when all take part)."""
        name = self.pool_name(recipe)
        return name if self.all_tasks else PoolName.parse(name).with_tasks(self.tasks)

    def draws(self) -> list[Draw]:
        order = {t: i for i, t in enumerate(self.tasks)}
        out = []
        for seed in self.seeds:
            for focal in self.tasks:
                members = [focal, *draw_partners(self.tasks, focal, self.partners, seed)]
                out.append(Draw(focal, seed, tuple(sorted(members, key=order.__getitem__))))
        return out

    def selection(self, recipe: str, group: Sequence[str]) -> str:
        return PoolName.parse(self.pool_name(recipe)).with_tasks(list(group))


def _trainer_class(registry: Any, trainer: str) -> type:
    from mergebench_core.training.methods import TrainingMethod

    reg = registry.method_registration(trainer)
    cls = reg.obj
    names = {f.name for f in dataclasses.fields(cls.Params)}
    if not (isinstance(cls, type) and issubclass(cls, TrainingMethod) and cls.produces == "pool") or \
            not set(SWITCHES) <= names:
        raise ConfigError(f"--trainer {trainer!r} must be a training method that derives pools and has the "
                          f"parameters {', '.join(SWITCHES)} (the mergeability plugin's `mergeability`)")
    return cls


def build_experiment(registry: Any, base_pool: ModelPool, *, modelpool: str, recipes: Sequence[str] | None,
                     methods: Sequence[str] | None, partners: int, seeds: Sequence[int] | None,
                     tasks: Sequence[str] | None, trainer: str, preset: str | None,
                     trainer_overrides: Sequence[Override]) -> Experiment:
    """Checks every input and fixes every recipe's parameters; nothing is trained or merged."""
    if not base_pool.has_pretrained or base_pool.relation != "finetuned":
        raise ConfigError(f"pool {modelpool!r} has no pretrained model (its models were trained independently), so "
                          f"its experts cannot be re-fine-tuned from one and have no task vectors; the mergeability "
                          f"experiment needs a pool of experts fine-tuned from one pretrained model")
    cls = _trainer_class(registry, trainer)
    trainer = registry.method_registration(trainer).name
    available = [base_pool.task_of(e) for e in base_pool.expert_names]
    if tasks:
        check_tasks(list(tasks), available, f"model pool {modelpool!r}")
    chosen = [t for t in available if not tasks or t in tasks]  # the pool's order: one name per group
    method_names = [registry.method_registration(m).name for m in (methods or DEFAULT_METHODS)]
    if len(set(method_names)) != len(method_names):
        raise ConfigError(f"--method names a method twice: {', '.join(method_names)}")
    seeds = list(seeds) if seeds else list(DEFAULT_SEEDS)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seed names a seed twice: {seeds}")
    presets: Mapping[str, Mapping[str, Any]] = getattr(cls, "presets", {}) or {}
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"training method {trainer!r} has no preset {preset!r}; presets: "
                              f"{', '.join(presets) or 'none'}")
        values.update(presets[preset])
    for ov in trainer_overrides:
        if ov.key in SWITCHES:
            raise ConfigError(f"{trainer}.{ov.key} is set by each recipe; choose recipes with --recipes "
                              f"({', '.join(RECIPES)})")
        if len(ov.values) != 1:
            raise ConfigError(f"{trainer}.{ov.key}: the experiment takes one value per training parameter, got "
                              f"{', '.join(ov.values)}")
    recipe_names = parse_recipes(recipes)
    exp = Experiment(modelpool, chosen, recipe_names, method_names, partners, seeds, trainer, values,
                     all_tasks=chosen == available)
    for recipe in recipe_names:
        switches = dict(zip(SWITCHES, RECIPES[recipe]))
        overrides = [Override(trainer, k, (_format_value(v),)) for k, v in {**values, **switches}.items()]
        overrides += [ov for ov in trainer_overrides]
        [params] = build_params(trainer, cls.Params, None, overrides)
        exp.recipe_params[recipe] = params
    exp.draws()  # checks --partners against the number of experts
    return exp


# -- features -------------------------------------------------------------------------------------------------------
def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


class FeatureCache:
    """JSON files under `root`, named by a hash of what determines their content."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, key: Mapping[str, Any], compute: Callable[[], Any]) -> Any:
        path = self.root / f"{_digest(key)}.json"
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
                if stored.get("key") == json.loads(json.dumps(key, sort_keys=True, default=str)):
                    return stored["value"]
            except (OSError, ValueError):
                pass
        value = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "value": value}, sort_keys=True, default=str))
        tmp.replace(path)
        return value


def _source(pool: ModelPool, name: str) -> Any:
    from mergebench_core.engine.tensors import StateDictSource

    tensor_source = getattr(pool, "tensor_source", None)
    return tensor_source(name) if tensor_source is not None else StateDictSource(pool.state_dict(name), name)


def task_vector_gram(pool: ModelPool, experts: Sequence[str]) -> list[list[float]]:
    """G[a][b] = ⟨τ_a, τ_b⟩ over every floating-point tensor, in float64, streaming one tensor of every model at a
    time: norms, cosines and distances of task vectors all follow from it."""
    base = _source(pool, PRETRAINED)
    sources = [_source(pool, e) for e in experts]
    gram = torch.zeros(len(experts), len(experts), dtype=torch.float64)
    for key in base.keys():  # noqa: SIM118 (a tensor source, not a dict)
        theta0 = base.get(key)
        if not theta0.is_floating_point():
            continue
        taus = torch.stack([(s.get(key).to(torch.float64) - theta0.to(torch.float64)).reshape(-1) for s in sources])
        gram += taus @ taus.T
    return gram.tolist()


def weight_features(gram: Sequence[Sequence[float]], index: Sequence[int]) -> dict[str, float]:
    """The weight-space features of a group of experts (rows of `gram`)."""
    g = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(g), 0, None))
    pairs = list(itertools.combinations(index, 2))
    dist = [math.sqrt(max(g[a, a] + g[b, b] - 2 * g[a, b], 0.0)) for a, b in pairs]
    cos = [g[a, b] / (norms[a] * norms[b]) if norms[a] * norms[b] > 0 else 0.0 for a, b in pairs]
    return {"weight_l2_distance": float(np.mean(dist)), "tau_cosine": float(np.mean(cos)),
            "tau_norm": float(np.mean([norms[i] for i in index]))}


def average_state(pool: ModelPool, members: Sequence[str]) -> dict[str, torch.Tensor]:
    """θ₀ + mean τ = the members' mean on floating-point tensors; the pretrained model's other buffers."""
    base = pool.state_dict(PRETRAINED)
    sums: dict[str, torch.Tensor] = {}
    for m in members:
        for k, v in pool.state_dict(m).items():
            if base[k].is_floating_point():
                sums[k] = sums[k] + v.to(torch.float32) if k in sums else v.to(torch.float32).clone()
    return {k: (sums[k] / len(members)).to(v.dtype) if v.is_floating_point() else v for k, v in base.items()}


def task_gradients(model: torch.nn.Module, taskpool: TaskPool, tasks: Sequence[str], *, examples: int,
                   device: torch.device, batch_size: int = 256) -> dict[str, list[torch.Tensor]]:
    """∇_θ of each task's mean cross-entropy over its first `examples` train examples (the task pool's order), θ
    every parameter of `model`, in evaluation mode."""
    model.to(device).eval()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    grads = {}
    with torch.inference_mode(False), torch.enable_grad():
        for task in tasks:
            model.zero_grad(set_to_none=True)
            count = 0
            for x, y in taskpool.batches(task, "train", batch_size=batch_size, limit=examples):
                x, y = x.to(device), y.to(device)
                logits = taskpool.logits(model, task, x).float()
                F.cross_entropy(logits, y, reduction="sum").backward()
                count += len(y)
            if count == 0:
                raise MergebenchError(f"task {task!r} has no train examples to take a gradient on")
            grads[task] = [(p.grad.detach().float() / count if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
                           for p in params]
    model.zero_grad(set_to_none=True)
    return grads


def gradient_distance(grads: Mapping[str, Sequence[torch.Tensor]], group: Sequence[str]) -> float:
    """Mean over unordered pairs of the group of ‖g_a − g_b‖₂."""
    out = []
    for a, b in itertools.combinations(group, 2):
        sq = sum(float((ga.double() - gb.double()).pow(2).sum()) for ga, gb in zip(grads[a], grads[b]))
        out.append(math.sqrt(sq))
    return float(np.mean(out))


# -- running --------------------------------------------------------------------------------------------------------
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


@dataclass
class Plan:
    """The experiment's draws, distinct groups, their pool selection per recipe, and the runner's cells."""

    draws: list[Draw]
    groups: list[tuple[str, ...]]
    selections: dict[tuple[str, tuple[str, ...]], str]
    cells: list[Any]


def plan_experiment(exp: Experiment, runner: Any) -> Plan:
    """Every merge cell of the experiment, planned (and so checked: names, parameters, pools, resources, cached
    models with --eval-only) by the runner; nothing is trained or merged."""
    draws = exp.draws()
    groups = list(dict.fromkeys(d.group for d in draws))
    selections = {(r, g): exp.selection(r, g) for r in exp.recipes for g in groups}
    runner.options.methods = list(exp.methods)
    runner.options.modelpools = list(selections.values())
    cells = runner.plan()
    per_pair: dict[tuple[str, str], int] = {}
    for c in cells:
        per_pair[(c.modelpool, c.method)] = per_pair.get((c.modelpool, c.method), 0) + 1
    swept = sorted({m for (_, m), n in per_pair.items() if n > 1})
    if swept:
        raise ConfigError(f"the experiment takes one configuration per merge method; {', '.join(swept)} got a sweep")
    return Plan(draws, groups, selections, cells)


def run_experiment(exp: Experiment, runner: Any, plan: Plan | None = None, *, analyze: bool = False,
                   grad_examples: int = 256, bootstrap: int = 2000, features: Sequence[str] = FEATURES,
                   features_cache: FeatureCache | None = None) -> ExperimentResult:
    """Builds the recipes' derived pools (timed), merges every group with every method as cells of the runner's
    store, compares recipes, and with `analyze` computes the groups' features and the regressions."""
    plan = plan or plan_experiment(exp, runner)
    draws, selections, cells = plan.draws, plan.selections, plan.cells
    if runner.store is None:
        raise MergebenchError("the runner has no results store")
    features_cache = features_cache or FeatureCache(cache_dir() / "mergeability")

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
        grams[recipe] = features_cache.get(key, lambda derived=derived, experts=experts:
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
            row["gradient_l2_distance"] = features_cache.get(key, compute)
            feats[group_label(group)] = {f: row[f] for f in FEATURES}
    for method in exp.methods:
        xs, ys = [], []
        for o in result.outcomes:
            if o.method == method and o.normalized is not None:
                f = result.features[o.recipe][group_label(o.group)]
                xs.append([f[name] for name in features])
                ys.append(o.normalized)
        result.regressions[method] = standardized_regression(xs, ys, features, bootstrap=bootstrap, seed=0)


# -- output ---------------------------------------------------------------------------------------------------------
def _pct(value: float | None, digits: int = 1) -> str:
    return "" if value is None or not math.isfinite(value) else f"{100 * value:.{digits}f}"


def _delta(p: Paired | None) -> str:
    if p is None or p.n == 0:
        return ""
    if not math.isfinite(p.low):
        return f"{100 * p.mean:+.2f}"
    return f"{100 * p.mean:+.2f} [{100 * p.low:+.2f}, {100 * p.high:+.2f}]"


def render(result: ExperimentResult, fmt: str = "github") -> str:
    from tabulate import tabulate

    tablefmt = {"github": "github", "latex": "latex_booktabs", "html": "html"}.get(fmt, fmt)
    exp = result.experiment
    out = []
    rows = [[s.recipe, s.pool, _pct(s.expert_accuracy), f"{s.tau_norm:.3f}",
             f"{s.train_seconds:.1f}" if s.trained_now else "cached"] for s in result.recipes]
    out.append(f"### Recipes on {exp.modelpool} ({exp.trainer}; experts of {len(exp.tasks)} tasks)\n")
    out.append(tabulate(rows, headers=["Recipe (suffix)", "Derived pool", "Experts' acc. (%)", "Mean ‖τ‖",
                                       "Training (s)"], tablefmt=tablefmt, disable_numparse=True))
    out.append("\n### Experts: accuracy on their own task (%) / ‖τ‖; each column is a recipe, named as the guide "
               "names its checkpoints\n")
    rows = []
    for task in exp.tasks:
        row = [task]
        for summary in result.recipes:
            e = summary.experts.get(f"{task}{summary.suffix}", {})
            row.append(f"{_pct(e.get('accuracy'))} / {e.get('tau_norm', math.nan):.3f}")
        rows.append(row)
    out.append(tabulate(rows, headers=["Task", *[f"{{task}}{s.suffix}" for s in result.recipes]],
                        tablefmt=tablefmt, disable_numparse=True))
    n_draws = len(result.draws)
    out.append(f"\n### Validation: each expert merged with {exp.partners} held-out partners, {len(exp.seeds)} "
               f"partner seed(s), {n_draws} draws; Δ = paired difference to baseline on the same draws, mean "
               f"[95 % t-interval], in points\n")
    rows = [[c.recipe, c.method, _pct(c.accuracy), _pct(c.normalized), _delta(c.delta_accuracy),
             _delta(c.delta_normalized), c.n] for c in result.comparison]
    out.append(tabulate(rows, headers=["Recipe", "Method", "Avg. (%)", "Norm. (%)", "Δ Avg.", "Δ Norm.", "n"],
                        tablefmt=tablefmt, disable_numparse=True))
    if result.regressions:
        first = next(iter(result.regressions.values()))
        out.append(f"\n### Stability: normalized accuracy of each merged group regressed on its features "
                   f"(standardised coefficients, {int(100 * first.level)} % bootstrap intervals over groups, "
                   f"{first.bootstrap} resamples)\n")
        rows = []
        for method, reg in result.regressions.items():
            for i, name in enumerate(reg.features):
                lo, hi = reg.intervals[i]
                rows.append([method if i == 0 else "", f"{reg.r2:.2f}" if i == 0 else "", reg.n if i == 0 else "",
                             name, f"{reg.coefficients[i]:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]",
                             f"{reg.vif[i]:.1f}"])
        out.append(tabulate(rows, headers=["Method", "R²", "Groups", "Feature", "Coef.", "95 % interval", "VIF"],
                            tablefmt=tablefmt, disable_numparse=True))
    return "\n".join(out)


def coefficient_figure(regressions: Mapping[str, Regression], out: str | Path, title: str = "") -> Path:
    """Each feature's standardised coefficient per method, with its bootstrap interval (PNG, SVG or PDF)."""
    from mergebench_core.results.plots import PLOT_FORMATS, _pyplot

    out = Path(out)
    if out.suffix.lower() not in PLOT_FORMATS:
        raise MergebenchError(f"plot file {str(out)!r}: use a .png, .svg or .pdf name")
    if not regressions:
        raise MergebenchError("no regression to plot: run with --analyze")
    plt = _pyplot()
    methods = list(regressions)
    features = regressions[methods[0]].features
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(features), 4.2))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        reg = regressions[method]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(features))]
        lo = [c - a for c, (a, _) in zip(reg.coefficients, reg.intervals)]
        hi = [b - c for c, (_, b) in zip(reg.coefficients, reg.intervals)]
        ax.errorbar(xs, reg.coefficients, yerr=[lo, hi], fmt="o", capsize=3, label=f"{method} (R² {reg.r2:.2f})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(features)))
    ax.set_xticklabels(features, fontsize=8)
    ax.set_ylabel("standardised coefficient")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "normalized merged accuracy vs group features", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# -- command line ---------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `mergebench mergeability`."""
    parser.add_argument("--modelpool", "-p", help="the pool whose experts are re-fine-tuned (default: the default "
                        "pool); it needs a pretrained model")
    parser.add_argument("--recipes", action="append", help="comma-separated, from baseline, moderate_update (R2), "
                        "grad_magnitude (R3), moderate_update_grad_magnitude (R2+R3); default: all four")
    parser.add_argument("--method", "-m", action="append",
                        help=f"merge methods, comma-separated (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--partners", "-k", type=int, default=3, help="held-out partners per expert (default 3)")
    parser.add_argument("--seed", action="append", help="partner-draw seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--tasks", action="append", help="only the experts of these tasks take part")
    parser.add_argument("--preset", help="a named training recipe of the trainer (mergeability: embedded, clip)")
    parser.add_argument("--trainer", default="mergeability", help="the training method deriving the recipes' pools")
    parser.add_argument("--analyze", action="store_true",
                        help="also the stability analysis: group features vs normalized accuracy, per method")
    parser.add_argument("--plot", help="with --analyze: write the coefficients per method to this .png/.svg/.pdf")
    parser.add_argument("--features", action="append", help=f"the regression's features, comma-separated, from "
                        f"{', '.join(FEATURES)} (default: all)")
    parser.add_argument("--grad-examples", type=int, default=256,
                        help="train examples per task for gradient_l2_distance (default 256)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--json", help="also write every number (draws, cells, features, regressions) to this file")
    parser.add_argument("--eval-only", action="store_true", help="never train: every recipe's experts must be cached")
    parser.add_argument("--limit", type=int, help="score only the first N test examples of each task")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rerun", action="store_true", help="recompute merge cells already in the store")
    parser.add_argument("--store", default=str(default_store()), help="results database (SQLite)")
    parser.add_argument("--format", default="github", choices=("github", "latex", "html"))
    parser.add_argument("overrides", nargs="*", help="mergeability.x=v sets a training parameter of every recipe "
                        "(e.g. mergeability.lambda_moderate_update=0.1); ties.x=v or method.x=v a merge parameter")


def _finite(value: Any) -> Any:
    """NaN and infinities as null, so the JSON file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _split(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def command(args: argparse.Namespace, progress: Callable[..., Iterator[Any]] | None = None) -> int:
    """`mergebench mergeability`: exit 0, 1 if a cell failed; bad input raises (exit 2 in the CLI)."""
    from mergebench_core.contract.registry import get_registry
    from mergebench_core.running.runner import Runner, RunOptions
    from mergebench_core.results.store import ResultStore

    registry = get_registry()
    seeds = []
    for s in _split(args.seed) or []:
        try:
            seeds.append(int(s))
        except ValueError:
            raise ConfigError(f"--seed {s!r} is not an integer; write --seed 0,1,2") from None
    if args.grad_examples < 1 or args.bootstrap < 1:
        raise ConfigError("--grad-examples and --bootstrap must be at least 1")
    if args.plot and not args.analyze:
        raise ConfigError("--plot draws the stability analysis: add --analyze")
    features = _split(args.features) or list(FEATURES)
    unknown = [f for f in features if f not in FEATURES]
    if unknown or len(set(features)) != len(features):
        raise ConfigError(f"--features: unknown or repeated {', '.join(unknown) or ', '.join(features)}; "
                          f"features: {', '.join(FEATURES)}")
    trainer = normalize_name(args.trainer)
    overrides = parse_overrides(args.overrides)
    trainer_overrides = [o for o in overrides if o.target == trainer]
    merge_overrides = [item for item, o in zip(args.overrides, overrides) if o.target != trainer]
    if args.modelpool:
        parsed = PoolName.parse(args.modelpool)
        if parsed != PoolName(parsed.base, base_params=parsed.base_params):
            raise ConfigError(f"--modelpool {args.modelpool!r}: name a plain pool (parameters allowed); the recipes "
                              f"derive its pools and --tasks selects experts")
        from mergebench_core.pools.params import canonical_names

        (modelpool,) = canonical_names(registry, args.modelpool)
    else:
        defaults = [n for n, r in sorted(registry.modelpools.items()) if r.default]
        if not defaults:
            raise MergebenchError("no model pool is marked as default; pass --modelpool")
        modelpool = defaults[0]
    options = RunOptions(methods=None, modelpools=None, overrides=merge_overrides, seeds=(0,), limit=args.limit,
                         device=args.device, rerun=args.rerun, batch_size=args.batch_size, eval_only=args.eval_only)
    runner = Runner(registry, None, options, progress=progress)
    exp = build_experiment(registry, runner.modelpool(modelpool), modelpool=modelpool,
                           recipes=_split(args.recipes), methods=_split(args.method), partners=args.partners,
                           seeds=seeds or None, tasks=_split(args.tasks), trainer=trainer, preset=args.preset,
                           trainer_overrides=trainer_overrides)
    plan = plan_experiment(exp, runner)  # every check before the store is opened: a refused run writes nothing
    rows = len(plan.groups) * len(exp.recipes)
    if args.analyze and rows < len(features) + 2:
        raise ConfigError(f"--analyze: the regression on {len(features)} features needs at least "
                          f"{len(features) + 2} merged groups, and this experiment has {rows} ({len(plan.groups)} "
                          f"distinct groups × {len(exp.recipes)} recipes); add seeds, experts or recipes")
    runner.store = ResultStore(args.store)
    result = run_experiment(exp, runner, plan, analyze=args.analyze, grad_examples=args.grad_examples,
                            bootstrap=args.bootstrap, features=features)
    print(render(result, args.format))
    if args.plot:
        print(f"wrote {coefficient_figure(result.regressions, args.plot, title=f'{modelpool}: merge stability')}")
    if args.json:
        Path(args.json).write_text(json.dumps(_finite(result.to_json()), indent=1, default=str))
        print(f"wrote {args.json}", file=sys.stderr)
    if result.reused:
        print(f"\n({result.reused} of {result.cells} merge cells reused from {args.store}; --rerun recomputes them)",
              file=sys.stderr)
    if result.failed:
        print(f"\n{len(result.failed)} cell(s) failed; their errors are stored in {args.store} "
              f"(`mergebench show --failed`).", file=sys.stderr)
        return 1
    return 0
