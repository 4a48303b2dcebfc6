"""Method parameters: the plugin's dataclass defaults, then a YAML file, then command-line overrides (omegaconf).

Overrides are dotlist items. `method.x=v` sets `x` on every selected method that has a parameter `x` (and is an
error if none has); `ties.x=v` sets it on one method. A comma outside brackets makes a sweep:
`method.scaling_factor=0.1,0.3` gives one configuration per value (the product over swept parameters).

A config file is data, not a program: interpolations (`${...}`) are refused rather than resolved, because nested
ones let a 1.5 KB file expand into gigabytes, and a resolved-size cap would only be checked after omegaconf had
built the expansion. YAML aliases (`*name`, `<<: *name`) are refused for the same reason (omegaconf copies what they
share), and so is a file over `MAX_CONFIG_BYTES`. `${oc.env:NAME}` would put the environment into stored parameters
without a word; a run that wants it names the variables it allows in `MERGEBENCH_CONFIG_ENV=NAME,...`, and then a
value written exactly `${oc.env:NAME}` is that variable's text.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergebench_core.errors import ConfigError, normalize_name

COMMON = "method"
CONFIG_ENV = "MERGEBENCH_CONFIG_ENV"
"""Comma-separated names of the environment variables a config file may read with `${oc.env:NAME}`."""
MAX_CONFIG_BYTES = 1 << 20
"""A config file names methods, pools and a few dozen values: a megabyte is far beyond any real one."""
_ENV_REF = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclasses.dataclass(frozen=True)
class Override:
    target: str  # COMMON or a normalized method name
    key: str
    values: tuple[str, ...]  # more than one: a sweep


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets and quotes, so list values (`[0.1,0.2]`) stay whole."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def parse_overrides(items: Sequence[str]) -> list[Override]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form method.parameter=value "
                              f"(for example method.scaling_factor=0.3)")
        path, value = item.split("=", 1)
        if "." not in path:
            raise ConfigError(f"override {item!r}: name the method, as in method.{path}={value} "
                              f"(all selected methods) or ties.{path}={value} (one method)")
        target, key = path.split(".", 1)
        values = tuple(v.strip() for v in split_top_level(value))
        if any(v == "" for v in values):
            raise ConfigError(f"override {item!r} has an empty value")
        out.append(Override(normalize_name(target), key.strip(), values))
    return out


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a config file: `method:` holds common values, `<method name>:` holds one method's values. Nothing in it
    is resolved: interpolations and aliases are refused (see the module's docstring), environment references only
    for the variables `MERGEBENCH_CONFIG_ENV` allows."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(p)!r} is {size:,} bytes, more than the {MAX_CONFIG_BYTES:,} a config "
                          f"file may hold; it should name methods, pools and their values only")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text: {exc}") from None
    _refuse_aliases(text, str(p))
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except Exception as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping (method: {{...}} or <method>: {{...}})")
    data = _without_interpolations(data, f"config file {str(p)!r}", "", allowed_env())
    return {normalize_name(str(k)): v for k, v in data.items()}


def allowed_env() -> frozenset[str]:
    """The environment variables config files may read (`MERGEBENCH_CONFIG_ENV`; none unless set)."""
    return frozenset(n.strip() for n in os.environ.get(CONFIG_ENV, "").split(",") if n.strip())


def _refuse_aliases(text: str, where: str) -> None:
    """Walk the YAML events (linear in the text, nothing built) and refuse the first alias."""
    import yaml

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(f"config file {where!r}, line {event.start_mark.line + 1}: the YAML alias "
                                  f"*{event.anchor} is refused, because aliases let a small file expand into a huge "
                                  f"one; write the values out where they are used")
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {where!r} is not valid YAML: {exc}") from None


def _without_interpolations(value: Any, where: str, key: str, env: frozenset[str]) -> Any:
    """`value` with every allowed `${oc.env:NAME}` replaced by the variable's text; any other `${` is refused with
    the key that holds it."""
    if isinstance(value, dict):
        return {k: _without_interpolations(v, where, f"{key}.{k}" if key else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_interpolations(v, where, f"{key}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    ref = _ENV_REF.fullmatch(value.strip())
    if ref and ref.group(1) in env:
        name = ref.group(1)
        if name not in os.environ:
            raise ConfigError(f"{where}, key {key!r}: reads environment variable {name}, which is not set; set it "
                              f"or write the value itself")
        if "${" in os.environ[name]:
            raise ConfigError(f"{where}, key {key!r}: environment variable {name} holds an interpolation "
                              f"({os.environ[name]!r}); it must hold the value itself")
        return os.environ[name]
    if "oc.env" in value:
        name = ref.group(1) if ref else "..."
        raise ConfigError(f"{where}, key {key!r}: {value!r} would read the environment into a parameter, which "
                          f"mergebench does not do unless asked; write the value itself, or allow the variable with "
                          f"{CONFIG_ENV}={name}")
    raise ConfigError(f"{where}, key {key!r}: {value!r} is an interpolation, and config files are not resolved "
                      f"(nested interpolations can expand a small file into gigabytes); write the value itself")


def field_types(params_cls: type) -> dict[str, str]:
    return {f.name: getattr(f.type, "__name__", str(f.type)) for f in dataclasses.fields(params_cls)}


def build_params(method_name: str, params_cls: type, yaml_cfg: Mapping[str, Any] | None = None,
                 overrides: Sequence[Override] = ()) -> list[Any]:
    """Every configuration of one method that the defaults, file and overrides describe (sweeps expanded)."""
    method_name = normalize_name(method_name)
    names = {f.name for f in dataclasses.fields(params_cls)}
    types = field_types(params_cls)
    base: dict[str, Any] = {}
    yaml_cfg = yaml_cfg or {}
    for section in (COMMON, method_name):
        values = yaml_cfg.get(section) or {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section {section!r} must be a mapping of parameter: value")
        for k, v in values.items():
            if k in names:
                base[k] = v
            elif section == method_name:
                raise unknown_parameter_error(method_name, k, types)

    swept: list[tuple[str, tuple[str, ...]]] = []
    for ov in overrides:
        if ov.target not in (COMMON, method_name):
            continue
        if ov.key not in names:
            if ov.target == method_name:
                raise unknown_parameter_error(method_name, ov.key, types)
            continue
        swept.append((ov.key, ov.values))

    configs = []
    keys = [k for k, _ in swept]
    for combo in itertools.product(*[vals for _, vals in swept]):
        dotlist = [f"{k}={v}" for k, v in zip(keys, combo)]
        configs.append(instantiate_params(method_name, params_cls, base, dotlist, types))
    return configs


def check_overrides_used(overrides: Sequence[Override], methods: Mapping[str, type]) -> None:
    """A `method.x` override that no selected method accepts is a typo, not something to ignore."""
    for ov in overrides:
        if ov.target == COMMON:
            if not any(ov.key in {f.name for f in dataclasses.fields(p)} for p in methods.values()):
                known = sorted({f.name for p in methods.values() for f in dataclasses.fields(p)})
                raise ConfigError(f"no selected method has a parameter {ov.key!r} (from method.{ov.key}=...). "
                                  f"Parameters of the selected methods: {', '.join(known) or 'none'}")
        elif ov.target not in methods:
            raise ConfigError(f"override {ov.target}.{ov.key}=... names method {ov.target!r}, which is not "
                              f"selected; selected: {', '.join(methods)}")


def unknown_parameter_error(owner: str, key: str, types: Mapping[str, str], kind: str = "method") -> ConfigError:
    """The error for a parameter `key` that `owner` (a method, or a model pool: `kind`) does not have: a typo is the
    usual cause, so it suggests the closest name and lists every parameter with its type."""
    close = difflib.get_close_matches(key, list(types), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(f"{k}: {t}" for k, t in types.items()) or "none"
    return ConfigError(f"{kind} {owner!r} has no parameter {key!r}.{hint} Its parameters: {listing}")


def instantiate_params(owner: str, params_cls: type, base: Mapping[str, Any], dotlist: list[str],
                       types: Mapping[str, str], kind: str = "method") -> Any:
    """`params_cls` with `base` (YAML values) and then `dotlist` (`k=v` strings) merged over its defaults, typed and
    checked by omegaconf. Every way a value can be refused (omegaconf's type check, the dataclass's own
    `__post_init__`) becomes one `ConfigError` naming `owner`; `kind` ("method", "model pool") says what it is."""
    for item in dotlist:
        if "${" in item:
            key, _, value = item.partition("=")
            raise ConfigError(f"{kind} {owner!r}: parameter {key.strip()!r} = {value.strip()!r} is an interpolation, "
                              f"which mergebench does not resolve in parameters; write the value itself (a shell "
                              f"expands $NAME on a command line)")
    base = _without_interpolations(dict(base), f"{kind} {owner!r}", "", allowed_env())
    if not base and not dotlist:  # the defaults: no need to import omegaconf (a fifth of a second at start-up)
        try:
            return params_cls()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{kind} {owner!r}: {exc}") from None
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.structured(params_cls)
        cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(base)), OmegaConf.from_dotlist(dotlist))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
        value = getattr(exc, "value", None)
        expected = types.get(str(key).split(".")[0], "?")
        raise ConfigError(f"{kind} {owner!r}: parameter {key!r} expects {expected}, got {value!r} "
                          f"({type(exc).__name__})") from None
    except (ValueError, TypeError) as exc:  # a Params.__post_init__ refused the value
        raise ConfigError(f"{kind} {owner!r}: {exc}") from None


def params_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)
