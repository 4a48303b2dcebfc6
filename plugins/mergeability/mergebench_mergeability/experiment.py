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

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mergebench_core import ConfigError, ModelPool
from mergebench_core.contract.config import Override, build_params
from mergebench_core.pools.views import PoolName, check_tasks

RECIPES: dict[str, tuple[bool, bool]] = {
    "baseline": (False, False),
    "moderate_update": (True, False),
    "grad_magnitude": (False, True),
    "moderate_update_grad_magnitude": (True, True),
}
"""Recipe name (the guide's checkpoint suffix, `baseline` for none) → (enable_moderate_update,
enable_grad_magnitude)."""
ALIASES = {"none": "baseline", "r2": "moderate_update", "r3": "grad_magnitude",
           "r2+r3": "moderate_update_grad_magnitude", "r2_r3": "moderate_update_grad_magnitude"}
SWITCHES = ("enable_moderate_update", "enable_grad_magnitude")
DEPENDENT = {"lambda_moderate_update": "enable_moderate_update", "lambda_grad_magnitude": "enable_grad_magnitude",
             "grad_magnitude_every": "enable_grad_magnitude"}
"""Parameters that only matter when their switch is on: left out of a recipe's name (and cache key) otherwise."""
DEFAULT_METHODS = ("task_arithmetic", "ties", "tsv_m", "regmean")
DEFAULT_SEEDS = (0, 1, 2)


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
