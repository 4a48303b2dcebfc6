"""MergeKit's method names and parameters, mapped onto registered mergebench methods, tensor by tensor.

MergeKit's generalized task arithmetic (task_arithmetic, ties, dare_ties, breadcrumbs) computes, per tensor,
θ_0 + λ · Σ_t w_t τ'_t (divided by Σ_t w_t over the entries kept when `normalize`), with τ'_t trimmed (`density`)
or dropped at random, and a sign election for the TIES variants. Our presets compute the same with one weight for
every model: equal weights fold into the scaling factor (or cancel, when normalised), so a config whose models'
weights or densities differ *at some tensor* is refused there, naming the key, rather than merged differently.
Breadcrumbs' trim (drop the top `gamma` and the smallest so that `density` remains) is the same in both.
`linear` and `slerp` map onto `weighted_average` and `slerp`; `passthrough` (copying one source, times `scale`) is
the slicing itself and is done by `run`.

Any other method name is looked up among the registered methods, so methods added by plugins under MergeKit's names
(`della`, `sce`, `karcher`, ...) run through a config too: top-level parameters set the Params field of the same
name (`lambda` sets `lambda_` or `scaling_factor`), and a per-model parameter sets the field of its name when every
model gives the same value, or else a field holding one value per model (`weight` → `weights`, `density` →
`densities`). A method class may declare `mergekit_defaults` (MergeKit's defaults of its fields, used where a config
gives no value) and `optional_base` (it takes a base model when the config names one); `int8_mask` is accepted and
ignored (it only changes how MergeKit stores masks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mergebench_core.mergekit.config import MergeKitConfigError

PASSTHROUGH = "passthrough"


@dataclass(frozen=True)
class TensorValues:
    """The parameters at one output tensor: `glob(name)` as the merge's, `model(j, name)` as source j's."""

    tensor: str
    glob: Callable[[str], Any]
    model: Callable[[int, str], Any]
    sources: tuple[str, ...]
    """Each source's place in the config (`models[1]`), for messages."""
    base: int | None
    """The index of the base model among the sources, or None."""


@dataclass(frozen=True)
class MethodCall:
    """What to run for one tensor: a registered method with its parameters, the source that is the base (None: no
    base), and the sources that are its experts, in order."""

    method: str
    params: tuple[tuple[str, Any], ...]
    base: int | None
    experts: tuple[int, ...]


GTA_DEFAULTS = {"task_arithmetic": (False, False), "ties": (True, False), "dare_ties": (False, True),
                "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False)}
"""MergeKit's (normalize, rescale) defaults of the generalized task-arithmetic methods mapped here."""

KNOWN = {
    "linear": {"weight", "normalize"},
    "slerp": {"t"},
    PASSTHROUGH: {"scale"},
    "task_arithmetic": {"weight", "lambda", "normalize"},
    "ties": {"weight", "density", "lambda", "normalize", "int8_mask"},
    "dare_ties": {"weight", "density", "lambda", "normalize", "rescale", "int8_mask"},
    "breadcrumbs": {"weight", "density", "gamma", "lambda", "normalize"},
    "breadcrumbs_ties": {"weight", "density", "gamma", "lambda", "normalize", "int8_mask"},
}
"""The parameters each mapped method honours (`int8_mask` only changes how MergeKit stores its masks)."""

PLURALS = {"weight": "weights", "density": "densities", "epsilon": "epsilons", "gamma": "gammas"}
ALIASES = {"lambda": ("lambda_", "scaling_factor")}


def method_call(name: str, v: TensorValues) -> MethodCall:
    """The registered method and parameters that compute MergeKit's `name` at tensor `v.tensor`."""
    if name == "linear":
        return _linear(v)
    if name == "slerp":
        return _slerp(v)
    if name == PASSTHROUGH:
        if len(v.sources) != 1:
            raise MergeKitConfigError(f"{v.sources[1]}: passthrough copies one model per slice, but this slice has "
                                      f"{len(v.sources)}")
        scale = _number(v.glob("scale"), "scale", v, None, default=1.0)
        return MethodCall(PASSTHROUGH, (("scale", scale),), None, (0,))
    if name in GTA_DEFAULTS:
        return _task_arithmetic_family(name, v)
    raise KeyError(name)


def _number(value: Any, key: str, v: TensorValues, j: int | None, default: float | None = None) -> float:
    where = v.sources[j] + ".parameters." + key if j is not None else "parameters." + key
    if value is None:
        if default is None:
            raise MergeKitConfigError(f"{where}: required (no value applies to tensor {v.tensor})")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeKitConfigError(f"{where}: must be a number, got {value!r} at tensor {v.tensor}")
    return float(value)


def _flag(value: Any, key: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, (bool, int, float)):
        return bool(value)
    raise MergeKitConfigError(f"parameters.{key}: must be true or false, got {value!r}")


def _linear(v: TensorValues) -> MethodCall:
    if v.base is not None and v.sources[v.base] == "base_model":
        raise MergeKitConfigError("base_model: linear averages the listed models and uses no base model; remove "
                                  "base_model, or list it under models with a weight")
    weights = [_number(v.model(j, "weight"), "weight", v, j) for j in range(len(v.sources))]
    normalize = _flag(v.glob("normalize"), "normalize", True)
    if normalize and abs(sum(weights)) < 1e-12:
        raise MergeKitConfigError(f"models: the weights at tensor {v.tensor} sum to zero and cannot be normalized")
    return MethodCall("weighted_average", (("normalize", normalize), ("weights", tuple(weights))), None,
                      tuple(range(len(v.sources))))


def _slerp(v: TensorValues) -> MethodCall:
    if v.base is None:
        raise MergeKitConfigError("base_model: slerp interpolates from the base model to the other one; name it")
    if len(v.sources) != 2:
        raise MergeKitConfigError(f"models: slerp interpolates exactly two models (the base and one other), got "
                                  f"{len(v.sources)}")
    t = _number(v.glob("t"), "t", v, None)
    return MethodCall("slerp", (("t", t),), None, (v.base, 1 - v.base))


def _same(values: list[float], key: str, v: TensorValues, experts: list[int]) -> float:
    if len(set(values)) > 1:
        listing = ", ".join(f"{v.sources[j]}: {x:g}" for j, x in zip(experts, values))
        raise MergeKitConfigError(f"{v.sources[experts[values.index(max(values))]]}.parameters.{key}: mergebench "
                                  f"merges with one {key} for every model, but at tensor {v.tensor} they differ "
                                  f"({listing}); give every model the same {key}")
    return values[0]


def _task_arithmetic_family(name: str, v: TensorValues) -> MethodCall:
    if v.base is None:
        raise MergeKitConfigError(f"base_model: {name} works on differences from a base model; name it")
    experts = [j for j in range(len(v.sources)) if j != v.base]
    if not experts:
        raise MergeKitConfigError(f"models: {name} needs at least one model besides the base")
    normalize_default, rescale_default = GTA_DEFAULTS[name]
    weight = _same([_number(v.model(j, "weight"), "weight", v, j) for j in experts], "weight", v, experts)
    lam = _number(v.glob("lambda"), "lambda", v, None, default=1.0)
    normalize = _flag(v.glob("normalize"), "normalize", normalize_default)
    if normalize:  # Σ w τ / Σ w: equal weights cancel, a weight of 0 leaves the base
        scale = lam if weight != 0 else 0.0
    else:
        scale = lam * weight
    if name in ("task_arithmetic", "breadcrumbs"):  # no election: normalising divides the sum by T · w
        scale = scale / len(experts) if normalize else scale
        if name == "task_arithmetic":
            return MethodCall(name, (("scaling_factor", scale),), v.base, tuple(experts))
        density = _same([_number(v.model(j, "density"), "density", v, j, default=1.0) for j in experts],
                        "density", v, experts)
        gamma = _same([_number(v.model(j, "gamma"), "gamma", v, j, default=0.01) for j in experts], "gamma", v,
                      experts)
        return MethodCall(name, (("density", density), ("gamma", gamma), ("scaling_factor", scale)), v.base,
                          tuple(experts))
    if weight < 0:  # MergeKit elects on the weighted vectors: a negative weight flips the election
        raise MergeKitConfigError(f"{v.sources[experts[0]]}.parameters.weight: a negative weight ({weight:g} at "
                                  f"tensor {v.tensor}) flips the sign election, which mergebench's {name} does not "
                                  f"do; use a positive weight and a negative lambda")
    density = _same([_number(v.model(j, "density"), "density", v, j, default=1.0) for j in experts], "density", v,
                    experts)
    if not 0.0 < density <= 1.0:
        raise MergeKitConfigError(f"{v.sources[experts[0]]}.parameters.density: must be in (0, 1], got {density:g} "
                                  f"at tensor {v.tensor}")
    combine = "mean" if normalize and weight != 0 else "sum"
    if name == "breadcrumbs_ties":
        gamma = _same([_number(v.model(j, "gamma"), "gamma", v, j, default=0.01) for j in experts], "gamma", v,
                      experts)
        params = {"density": density, "gamma": gamma, "combine": combine, "scaling_factor": scale}
    elif name == "ties":
        params = {"k": density, "scope": "tensor", "combine": combine, "scaling_factor": scale}
    else:
        params = {"p": 1.0 - density, "rescale": _flag(v.glob("rescale"), "rescale", rescale_default), "k": 1.0,
                  "scope": "tensor", "combine": combine, "scaling_factor": scale}
    return MethodCall(name, tuple(sorted(params.items())), v.base, tuple(experts))


IGNORED = {"int8_mask"}
"""MergeKit parameters that change only how MergeKit stores intermediate masks, never a merged value."""


def generic_call(name: str, params_cls: type, requires_base: bool, per_model: set[str], glob: set[str],
                 v: TensorValues, optional_base: bool = False,
                 defaults: dict[str, Any] | None = None) -> MethodCall:
    """A registered method that has MergeKit's name: parameters by field name (see the module docstring).

    `optional_base`: the method uses a base when the config names one (MergeKit's `BasePolicy.OPTIONAL`: multislerp,
    nuslerp interpolate task vectors then) and merges the listed models' weights otherwise. `defaults` are MergeKit's
    own defaults of the method's fields (a method's `mergekit_defaults`), applied where the config gives no value, so
    that a config means what it means in MergeKit rather than the benchmark's defaults."""
    fields = {f.name for f in dataclasses.fields(params_cls)}
    if requires_base and v.base is None:
        raise MergeKitConfigError(f"base_model: {name} needs a base model; name it")
    with_base = requires_base or (optional_base and v.base is not None)
    experts = [j for j in range(len(v.sources)) if j != v.base] if with_base else list(range(len(v.sources)))
    out: dict[str, Any] = dict(defaults or {})
    glob, per_model = glob - IGNORED, per_model - IGNORED
    for key in sorted(glob):
        target = next((f for f in (key, *ALIASES.get(key, ())) if f in fields), None)
        if target is None:
            raise MergeKitConfigError(f"parameters.{key}: {name} takes no such parameter (it takes "
                                      f"{', '.join(sorted(fields))})")
        value = v.glob(key)
        if value is not None:
            out[target] = value
    for key in sorted(per_model):
        values = [v.model(j, key) for j in experts]
        if all(x is None for x in values):
            continue
        if key in fields and len(set(values)) == 1:
            out[key] = values[0]
        elif PLURALS.get(key) in fields:
            out[PLURALS[key]] = tuple(values)
        else:
            raise MergeKitConfigError(f"{v.sources[experts[0]]}.parameters.{key}: {name} takes no per-model {key} "
                                      f"(it takes {', '.join(sorted(fields))})")
    return MethodCall(name, tuple(sorted(out.items())), v.base if with_base else None, tuple(experts))
