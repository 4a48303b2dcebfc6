"""Method parameters: the plugin's dataclass defaults, then a YAML file, then command-line overrides (omegaconf).

Overrides are dotlist items. `method.x=v` sets `x` on every selected method that has a parameter `x` (and is an
error if none has); `ties.x=v` sets it on one method. A comma outside brackets makes a sweep:
`method.scaling_factor=0.1,0.3` gives one configuration per value (the product over swept parameters).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergebench_core.errors import ConfigError, normalize_name

COMMON = "method"


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
    """Read a config file: `method:` holds common values, `<method name>:` holds one method's values."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    except Exception as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping (method: {{...}} or <method>: {{...}})")
    return {normalize_name(str(k)): v for k, v in data.items()}


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
                raise unknown_parameter(method_name, k, types)

    swept: list[tuple[str, tuple[str, ...]]] = []
    for ov in overrides:
        if ov.target not in (COMMON, method_name):
            continue
        if ov.key not in names:
            if ov.target == method_name:
                raise unknown_parameter(method_name, ov.key, types)
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


def unknown_parameter(method: str, key: str, types: Mapping[str, str], kind: str = "method") -> ConfigError:
    """The error for a parameter `key` that `method` (a method, or a model pool with `kind`) does not have,
    suggesting the closest name and listing every parameter with its type."""
    import difflib
    close = difflib.get_close_matches(key, list(types), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(f"{k}: {t}" for k, t in types.items()) or "none"
    return ConfigError(f"{kind} {method!r} has no parameter {key!r}.{hint} Its parameters: {listing}")


def instantiate_params(method: str, params_cls: type, base: Mapping[str, Any], dotlist: list[str],
                       types: Mapping[str, str], kind: str = "method") -> Any:
    """`params_cls` with `base` (YAML values) and then `dotlist` (`k=v` strings) merged over its defaults, typed and
    checked by omegaconf; `kind` ("method", "model pool") names the owner in errors."""
    if not base and not dotlist:  # the defaults: no need to import omegaconf (a fifth of a second at start-up)
        try:
            return params_cls()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{kind} {method!r}: {exc}") from None
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
        raise ConfigError(f"{kind} {method!r}: parameter {key!r} expects {expected}, got {value!r} "
                          f"({type(exc).__name__})") from None
    except (ValueError, TypeError) as exc:  # a Params.__post_init__ refused the value
        raise ConfigError(f"{kind} {method!r}: {exc}") from None


_unknown, _instantiate = unknown_parameter, instantiate_params  # the names other modules imported before


def params_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)
