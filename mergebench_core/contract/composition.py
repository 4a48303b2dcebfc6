"""Methods that run on top of another method's merged model: a *method spec* names the base and its parameters.

Post-hoc methods (SVC's singular value calibration, LiNeS's layer scaling, a later Surgery) change a model that
another method merged. They take the base as one string parameter, a spec:

    ties                                   the method with its defaults
    ties(k=0.1,scaling_factor=0.5)         with parameters (the names of `mergebench list`; hyphens accepted)
    svc(base=ties(k=0.1))                  nested: a spec's value may be a spec

Commas inside parentheses belong to the spec, so a command line override stays one value
(`svc.base=ties(k=0.1,scaling_factor=0.5)`) and a sweep still splits at the top level
(`svc.base=ties,task_arithmetic`: two cells).

A spec is resolved once, when the method's parameters are built (`canonical_spec` in the parameter dataclass's
`__post_init__`), into its canonical text: the registered name, then *every* parameter of the base with its value,
sorted (`ties(combine=sum,k=0.2,scaling_factor=0.3,scope=global)`). The stored parameters, and so the cell's
identity, then say exactly what produced the base model: changing a default of the base's plugin changes the key.
Errors are `ConfigError`s (exit 2 before any work): an unknown method gets the registry's "did you mean", an unknown
parameter the closest parameter name and the list of them, a bad value the base's own check.

The base must produce one model: methods that yield an ensemble or one model per task are refused by name.
`run_base` runs it on the pool with the cell's context and returns its output.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from mergebench_core.contract.api import MergeOutput, Method, ModelPool, RunContext
from mergebench_core.contract.config import (
    field_types,
    instantiate_params,
    params_dict,
    split_top_level,
    unknown_parameter_error,
)
from mergebench_core.errors import ConfigError, MergebenchError, normalize_name

_SPEC = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method class with validated parameters, as a spec string named them."""

    method: type[Method]
    params: Any

    @property
    def name(self) -> str:
        return self.method.name

    def canonical(self) -> str:
        """The spec with every parameter spelled out, sorted: the text stored in a cell's parameters."""
        values = params_dict(self.params)
        if not values:
            return self.name
        return f"{self.name}({','.join(f'{k}={format_value(values[k])}' for k in sorted(values))})"

    def build(self) -> Method:
        return self.method(self.params)


def format_value(value: Any) -> str:
    """A parameter value as a spec writes it (and omegaconf reads it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def parse_spec(text: str, registry: Any | None = None, *, owner: str = "") -> MethodSpec:
    """The method and validated parameters `text` names (see the module docstring). `registry` defaults to the
    process's; `owner` ("svc.base") starts every error message, so a user sees which parameter held the spec."""
    where = f"{owner}={text!r}: " if owner else f"method spec {text!r}: "
    if not isinstance(text, str):
        raise ConfigError(f"{where}a method spec is a string such as 'ties' or 'ties(k=0.1)'")
    match = _SPEC.match(text)
    if match is None:
        raise ConfigError(f"{where}write a method name, optionally with parameters in parentheses, such as "
                          f"'ties' or 'ties(k=0.1,scaling_factor=0.5)'")
    name, inside = normalize_name(match.group(1)), match.group(2)
    if registry is None:
        from mergebench_core.contract.registry import get_registry

        registry = get_registry()
    try:
        method = registry.method(name)
    except MergebenchError as exc:
        raise ConfigError(f"{where}{exc}") from None
    info = method.info
    if info.task_specific or info.kind == "ensemble":
        raise ConfigError(f"{where}method {name!r} yields {'one model per task' if info.task_specific else 'an ensemble'}"
                          f", and a method on top of it needs one merged model; choose a merging method")
    types = field_types(method.Params)
    dotlist = []
    for item in split_top_level(inside or ""):
        if not item.strip():
            if inside and inside.strip():
                raise ConfigError(f"{where}an empty parameter between commas")
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"{where}{item.strip()!r} is not key=value")
        if key not in types:
            raise ConfigError(f"{where}{unknown_parameter_error(name, key, types)}") from None
        dotlist.append(f"{key}={value.strip()}")
    try:
        params = instantiate_params(name, method.Params, {}, dotlist, types)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    return MethodSpec(method, params)


def canonical_spec(text: str, *, owner: str = "") -> str:
    """`text` resolved and spelled out (for a parameter dataclass's `__post_init__`): the same for every way of
    writing one base, and different whenever the base's effective parameters differ."""
    return parse_spec(text, owner=owner).canonical()


def run_base(spec: MethodSpec | str, pool: ModelPool, ctx: RunContext) -> MergeOutput:
    """Run the base method on `pool` with the cell's context; its output is one model (`output.model`)."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    refusal = spec.method.refusal(pool, spec.params)
    if refusal:
        raise MergebenchError(f"base method {spec.name!r} cannot run on pool {pool.name!r}: {refusal}")
    ctx.log.info("running the base method %s", spec.canonical())
    output = spec.build().run(pool, ctx)
    if not isinstance(output.model, nn.Module):
        raise MergebenchError(f"base method {spec.name!r} returned a {type(output.model).__name__}, not one model")
    return output


def with_base_extras(output: MergeOutput, base: MergeOutput, spec: MethodSpec) -> MergeOutput:
    """`output` with the base's spec and extras stored under `base` (so a result keeps what its base reported)."""
    extras = dict(output.extras)
    extras["base"] = {"spec": spec.canonical(), **({"extras": base.extras} if base.extras else {})}
    return dataclasses.replace(output, extras=extras)


class OnBaseMethod(Method):
    """A method that changes the model another method merged. Its `Params` have a `base: str` field holding a spec,
    resolved in their `__post_init__` with `canonical_spec(self.base, owner="<name>.base")`. The base's refusal
    (a task-vector base on independently trained models) is this method's refusal too, asked before any work."""

    def base_spec(self) -> MethodSpec:
        return parse_spec(self.params.base, owner=f"{self.name}.base")

    @classmethod
    def refusal(cls, pool: ModelPool, params: Any) -> str | None:
        spec = parse_spec(params.base, owner=f"{cls.name}.base")
        why = spec.method.refusal(pool, spec.params)
        if why:
            return f"its base method {spec.name!r} cannot run here: {why}"
        return super().refusal(pool, params)

    def run_base(self, pool: ModelPool, ctx: RunContext) -> tuple[MethodSpec, MergeOutput]:
        spec = self.base_spec()
        return spec, run_base(spec, pool, ctx)
