"""Model-pool parameters: a recipe variant (another fine-tuning learning rate) is chosen by name, not by a new plugin.

A pool plugin declares its parameters as a dataclass, every field with a default that reproduces the pool as
registered, and registers it with the pool:

    register("digits-mlp_TA8", make_pool, "...", params=DigitsPoolParams)   # make_pool(params) -> ModelPool

Values are typed and checked like a method's parameters (`config.py`): the dataclass defaults, then the config file's
`modelpool:` section, then `pool.key=value` overrides (a comma makes a sweep: one pool per value), then the name's own
`NAME(key=value,...)`. A `pool.` key or `modelpool:` key applies to every selected pool that declares it and is an
error (with "did you mean") when none does; a key given both in a name and as `pool.key=` is an error, not a silent
choice.

Identity: a variant is stored under its canonical name, `NAME(k=v,...)` with the keys sorted, only the values that
differ from the defaults, and one spelling per value (`format_value`: `3e-5` and `0.00003` are both `3e-05`). So a
variant's rows never mix with the default pool's, and the defaults give exactly the registered name, keeping every
row stored before the pool had parameters. Caches are the pool's business: whatever it writes (trained experts,
statistics through `ModelPool.identity`, version_info) must change with the parameters.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mergebench_core.contract.api import ModelPool, Registration
from mergebench_core.contract.checked_params import declared_bounds
from mergebench_core.contract.config import Override, field_types, instantiate_params, unknown_parameter_error
from mergebench_core.errors import ConfigError
from mergebench_core.pools.views import PoolName

POOL_TARGET = "pool"
"""The override prefix: `pool.lr=3e-5` sets `lr` on every selected pool that has it."""
POOL_SECTION = "modelpool"
"""The config file's section: `modelpool: {lr: 3e-5}` applies as `pool.lr=3e-5` does (before the overrides)."""
_RESERVED = set(",()[]+=") | {" ", "\t", "\n"}
_KIND = "model pool"


def check_training_recipe(lr: float, steps: int, batch_size: int, seed: int | None = None) -> None:
    """The checks every pool whose parameters are a training recipe needs, in one place: a finite positive learning
    rate, at least one step of at least one example, a non-negative seed. Raises ValueError (reported as a bad pool
    parameter). Kept for pools written before bounds were declared: a pool's parameter dataclass should now declare
    its bounds, upper ones included, as a `CheckedParams` (`mergebench list` then shows them)."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be 0 or more, got {seed}")


def format_value(value: Any) -> str:
    """The one spelling of a parameter value in a pool name: Python's shortest round-trip form for floats (`3e-05`,
    `0.0003`, `1.0`), `true`/`false`, integers as digits, lists in brackets. A string may not hold the characters the
    name grammar uses."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return format_value(value.name)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"a pool parameter must be finite to be part of a pool's name, got {value!r}")
        return repr(value)
    if isinstance(value, str):
        if not value or _RESERVED & set(value):
            raise ConfigError(f"pool parameter value {value!r} cannot be part of a pool's name: it is empty or holds "
                              f"one of , ( ) [ ] + = or a space")
        return value
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    raise ConfigError(f"pool parameter value {value!r} ({type(value).__name__}) has no spelling in a pool name; "
                      f"use int, float, bool, str, enums or lists of them")


def canonical_params(params: Any) -> tuple[str, ...]:
    """`key=value` items of the fields that differ from the dataclass defaults, sorted by key: the part of a pool's
    name that its parameters contribute (empty for the defaults)."""
    defaults = type(params)()
    return tuple(f"{f.name}={format_value(getattr(params, f.name))}"
                 for f in sorted(dataclasses.fields(params), key=lambda f: f.name)
                 if getattr(params, f.name) != getattr(defaults, f.name))


def describe_params(params_cls: type) -> str:
    """`lr: float = 0.0003 (0 < lr <= 10), steps: int = 200 (1 <= steps <= 1000000)` (for `mergebench list` and
    errors): each field's type and default, and its bounds where the dataclass declares them (`CheckedParams`)."""
    defaults, types, bounds = params_cls(), field_types(params_cls), declared_bounds(params_cls)
    return ", ".join(f"{f.name}: {types[f.name]} = {_default_text(getattr(defaults, f.name))}" +
                     (f" ({bounds[f.name]})" if f.name in bounds else "") for f in dataclasses.fields(params_cls))


def _default_text(value: Any) -> str:
    """A default as `describe_params` shows it: an empty string default ("none given") is shown as "", which no
    name can spell."""
    return '""' if value == "" else format_value(value)


def pool_params(reg: Registration, given: Sequence[str], common: Mapping[str, Any] | None = None,
                overrides: Sequence[Override] = ()) -> list[Any]:
    """Every parameter instance of pool `reg` that the config section, the `pool.` overrides (sweeps expanded) and
    the name's own `key=value` items describe, in that order of precedence (the name last)."""
    if reg.params is None:
        if given:
            raise ConfigError(f"{_kind(reg)} {reg.name!r} takes no parameters, and the name gives "
                              f"({','.join(given)}); drop them")
        return [None]
    types = field_types(reg.params)
    names = set(types)
    given = _list_items_joined(given, types)
    named: list[str] = []
    for item in given:
        key, eq, _ = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{_kind(reg)} {reg.name!r}: {item!r} is not of the form key=value")
        if key.strip() not in names:
            raise unknown_parameter_error(reg.name, key.strip(), types, kind=_kind(reg))
        named.append(key.strip())
    if len(set(named)) != len(named):
        raise ConfigError(f"{_kind(reg)} {reg.name!r}: a parameter is given twice in ({','.join(given)})")
    base = {k: v for k, v in (common or {}).items() if k in names}
    swept: list[tuple[str, tuple[str, ...]]] = []
    for ov in overrides:
        if ov.target != POOL_TARGET or ov.key not in names:
            continue
        if ov.key in named:
            raise ConfigError(f"model pool {reg.name!r}: {ov.key} is given both in the pool's name and as "
                              f"{POOL_TARGET}.{ov.key}=...; give it once")
        swept.append((ov.key, ov.values))
    keys = [k for k, _ in swept]
    out = []
    for combo in itertools.product(*[values for _, values in swept]):
        dotlist = [f"{k}={v}" for k, v in zip(keys, combo)] + [item.strip() for item in given]
        try:
            out.append(instantiate_params(reg.name, reg.params, base, dotlist, types, kind=_kind(reg)))
        except ConfigError as exc:  # say what the pool accepts, so the fix is in the message
            raise ConfigError(f"{exc}. Parameters of {reg.name}: {describe_params(reg.params)}") from None
    return out


def _kind(reg: Registration) -> str:
    return "task pool" if reg.kind == "taskpool" else _KIND


def _list_items_joined(given: Sequence[str], types: Mapping[str, str]) -> list[str]:
    """`tasks=a,b` as `tasks=[a,b]` when `tasks` is a list or tuple field: the items after a list key that hold no
    `=` are its further values (`lmeval(tasks=arc_easy,gsm8k)`, as lm-eval's users write task lists)."""
    out: list[str | list[str]] = []
    listing: list[str] | None = None  # [key, value, value, ...] of the list being read
    for item in given:
        if listing is not None and "=" not in item:
            listing.append(item.strip())
            continue
        key, eq, value = item.partition("=")
        if eq and types.get(key.strip(), "").lower().startswith(("list", "tuple")) and \
                not value.strip().startswith("["):
            listing = [key.strip(), value.strip()]
            out.append(listing)  # further values are appended to it in place
        else:
            listing = None
            out.append(item)
    return [f"{i[0]}=[{','.join(i[1:])}]" if isinstance(i, list) else i for i in out]


def canonical_names(registry: Any, name: str, common: Mapping[str, Any] | None = None,
                    overrides: Sequence[Override] = ()) -> list[str]:
    """The canonical name of every pool that `name` (any spelling, derived and task suffixes included) selects under
    the config section and overrides: one per value of a swept `pool.` parameter, duplicates dropped."""
    parsed = PoolName.parse(name)
    reg = registry.modelpool(parsed.base)
    out: dict[str, None] = {}
    for params in pool_params(reg, parsed.base_params, common, overrides):
        items = canonical_params(params) if params is not None else ()
        canonical = dataclasses.replace(parsed, base=reg.name, base_params=items)
        out[canonical.with_tasks(parsed.tasks)] = None
    return list(out)


def canonical_filter(registry: Any, name: str) -> str:
    """The stored spelling of a pool name given to `leaderboard -p` (or `show`, `plot`): `NAME(lr=3e-5)` finds the
    rows of `NAME(lr=3e-05)`. A name the installed plugins cannot resolve (a pool since uninstalled) is kept as
    given, so stored rows stay reachable."""
    try:
        names = canonical_names(registry, name)
    except Exception:  # noqa: BLE001 - a filter of stored rows should never fail on what is installed today
        return name
    return names[0] if len(names) == 1 else name


def make_pool(reg: Registration, parsed: PoolName) -> Any:
    """Build the plain pool `parsed` names (no derived or task suffix): `factory(params)` for pools that declare
    parameters, `factory()` otherwise. A pool built with non-default parameters is named canonically. Model pools
    and task pools (`lmeval(tasks=...)`) are built the same way."""
    (params,) = pool_params(reg, parsed.base_params)
    pool = reg.obj() if reg.params is None else reg.obj(params)
    items = canonical_params(params) if params is not None else ()
    pool.name = PoolName(reg.name, base_params=items).pool if items else (pool.name or reg.name)
    return pool


def check_pool_settings(regs: Iterable[Registration], common: Mapping[str, Any] | None,
                        overrides: Sequence[Override]) -> None:
    """A `pool.key=` override or `modelpool:` key that no selected pool declares is a typo, not something to ignore:
    refuse it, with the closest parameter of the selected pools."""
    regs = list(regs)
    declared: dict[str, str] = {}
    for reg in regs:
        if reg.params is not None:
            declared.update(field_types(reg.params))
    asked = [(f"{POOL_TARGET}.{ov.key}=...", ov.key) for ov in overrides if ov.target == POOL_TARGET]
    asked += [(f"the config file's {POOL_SECTION}: section", key) for key in (common or {})]
    for where, key in asked:
        if key in declared:
            continue
        close = difflib.get_close_matches(key, list(declared), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        pools = ", ".join(r.name for r in regs)
        listing = ", ".join(f"{k}: {t}" for k, t in declared.items())
        raise ConfigError(f"no selected model pool has a parameter {key!r} (from {where}).{hint} " +
                          (f"Parameters of the selected pools ({pools}): {listing}" if declared else
                           f"The selected pools ({pools}) take no parameters; `mergebench list` shows which do"))


def pool_section(yaml_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config file's `modelpool:` section, checked to be a mapping."""
    section = yaml_cfg.get(POOL_SECTION) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"config section {POOL_SECTION!r} must be a mapping of parameter: value "
                          f"(e.g. {POOL_SECTION}: {{lr: 3.0e-5}})")
    return dict(section)
