"""Reading a MergeKit merge config (the YAML that `mergekit-yaml` takes) into typed values, refusing by key.

MergeKit itself ignores keys it does not know and some it does not use; here every key is either honoured or
refused with its place in the file (`slices[1].sources[0].layer_range`), so a config never merges differently from
what its author wrote without saying so. The accepted shape is MergeKit's: exactly one of `models:` and `slices:`,
parameters at the top, per slice, and per model or slice source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from mergebench_core.errors import MergebenchError


class MergeKitConfigError(MergebenchError):
    """A MergeKit config that mergebench cannot honour; the message names the key."""


Scalar = Union[float, int, bool, str]


@dataclass(frozen=True)
class Conditional:
    """One `- filter: mlp / value: ...` entry of a parameter: applies to tensors whose name contains `filter`
    (every tensor when it is None or "*")."""

    value: Scalar | tuple[Scalar, ...]
    filter: str | None = None


Setting = Union[Scalar, tuple[Scalar, ...], tuple[Conditional, ...]]
"""A parameter's value as written: a scalar, a gradient (a list interpolated over layers), or conditionals."""


@dataclass(frozen=True)
class Source:
    """A model feeding a slice: `layer_range` None means all its layers (`models:` syntax)."""

    model: str
    layer_range: tuple[int, int] | None
    parameters: Mapping[str, Setting]
    where: str
    """Its place in the file, for messages (`models[2]`, `slices[0].sources[1]`)."""


@dataclass(frozen=True)
class Slice:
    sources: tuple[Source, ...]
    parameters: Mapping[str, Setting]
    where: str


@dataclass(frozen=True)
class MergeKitConfig:
    """A checked config. `slices` holds one slice of whole models for the `models:` syntax (`from_models`)."""

    merge_method: str
    base_model: str | None
    slices: tuple[Slice, ...]
    from_models: bool
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    tokenizer_source: str | None = None
    text: str = ""
    """The file as written (it goes into the model card)."""

    def model_refs(self) -> list[str]:
        """Every model named, base first, each once, in the order of first mention."""
        refs = [self.base_model] if self.base_model else []
        for s in self.slices:
            refs += [src.model for src in s.sources]
        return list(dict.fromkeys(refs))


TOP_KEYS = {"merge_method", "base_model", "models", "slices", "dtype", "out_dtype", "tokenizer_source", "parameters"}
REFUSED = {
    "modules": "per-module configs (multimodal models) are not supported; merge one module's weights with "
               "`models:` or `slices:`",
    "tokenizer": "building a new tokenizer (added tokens, permuted embeddings) is not supported; use "
                 "`tokenizer_source: base` or leave it out (the base model's tokenizer is copied)",
    "chat_template": "chat templates are not rewritten; the base model's tokenizer files are copied as they are",
    "residual_weight": "residual weights are not supported",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_config(path: str | Path) -> MergeKitConfig:
    """Read and check a MergeKit config file."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise MergeKitConfigError(f"--config {path}: cannot read it ({exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergeKitConfigError(f"--config {path} is not valid YAML: {exc}") from exc
    return parse_config(data, text=text, where=str(path))


def parse_config(data: Any, *, text: str = "", where: str = "the config") -> MergeKitConfig:
    """Check a config already parsed from YAML (a mapping) and return it typed."""
    if not isinstance(data, Mapping):
        raise MergeKitConfigError(f"{where} must be a mapping of MergeKit keys (merge_method, models, ...), got "
                                  f"{type(data).__name__}")
    _check_keys(data, TOP_KEYS, "")
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise MergeKitConfigError("merge_method: required, the name of a merge method (ties, linear, slerp, ...)")
    base = _model_ref(data["base_model"], "base_model") if data.get("base_model") is not None else None
    has_models, has_slices = bool(data.get("models")), bool(data.get("slices"))
    if has_models == has_slices:
        raise MergeKitConfigError("models / slices: give exactly one of them (a list of models to merge whole, or "
                                  "a list of output slices)")
    if has_models:
        models = _list(data["models"], "models")
        sources = tuple(_source(m, f"models[{i}]", slices=False) for i, m in enumerate(models))
        slices: tuple[Slice, ...] = (Slice(sources, {}, "models"),)
    else:
        slices = tuple(_slice(s, f"slices[{i}]", base) for i, s in enumerate(_list(data["slices"], "slices")))
    tokenizer = data.get("tokenizer_source")
    if tokenizer is not None and tokenizer != "base" and tokenizer != base:
        raise MergeKitConfigError(f"tokenizer_source: {tokenizer!r} is not supported; only `base` (the base "
                                  f"model's tokenizer files are copied), which is also what leaving it out does")
    if tokenizer is not None and base is None:
        raise MergeKitConfigError("tokenizer_source: `base` names the base model's tokenizer, but the config has no "
                                  "base_model; name one, or leave tokenizer_source out (the first model's is copied)")
    return MergeKitConfig(
        merge_method=method, base_model=base, slices=slices, from_models=has_models,
        parameters=_parameters(data.get("parameters"), "parameters"),
        dtype=_dtype(data.get("dtype"), "dtype"), out_dtype=_dtype(data.get("out_dtype"), "out_dtype"),
        tokenizer_source=None if tokenizer is None else "base", text=text)


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        name = f"{where}.{key}" if where else str(key)
        if key in REFUSED:
            raise MergeKitConfigError(f"{name}: {REFUSED[key]}")
        if key not in allowed:
            raise MergeKitConfigError(f"{name}: not a key mergebench knows here (it knows {', '.join(sorted(allowed))})"
                                      f"; remove it or check its spelling")


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise MergeKitConfigError(f"{where}: must be a list, got {type(value).__name__}")
    return value


def _model_ref(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MergeKitConfigError(f"{where}: must name a model (a folder or a Hugging Face repository id), got "
                                  f"{value!r}")
    if "+" in value:
        raise MergeKitConfigError(f"{where}: {value!r} applies a LoRA adapter (model+lora), which is not supported; "
                                  f"merge the adapter into its model first")
    return value.strip()


def _source(data: Any, where: str, *, slices: bool) -> Source:
    if not isinstance(data, Mapping):
        raise MergeKitConfigError(f"{where}: must be a mapping with `model:`, got {type(data).__name__}")
    _check_keys(data, {"model", "parameters", "layer_range"} if slices else {"model", "parameters"}, where)
    if "model" not in data:
        raise MergeKitConfigError(f"{where}.model: required")
    layer_range = None
    if slices:
        lr = data.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(type(x) is int for x in lr) and 0 <= lr[0] < lr[1]):
            raise MergeKitConfigError(f"{where}.layer_range: must be [start, end) with 0 <= start < end, got {lr!r}")
        layer_range = (lr[0], lr[1])
    return Source(_model_ref(data["model"], f"{where}.model"), layer_range,
                  _parameters(data.get("parameters"), f"{where}.parameters"), where)


def _slice(data: Any, where: str, base: str | None) -> Slice:
    if not isinstance(data, Mapping):
        raise MergeKitConfigError(f"{where}: must be a mapping with `sources:`, got {type(data).__name__}")
    _check_keys(data, {"sources", "parameters", "base_model"}, where)
    own_base = data.get("base_model")
    if own_base is not None and own_base != base:
        raise MergeKitConfigError(f"{where}.base_model: a base model per slice ({own_base!r}) differing from the "
                                  f"top-level base_model ({base!r}) is not supported")
    sources = _list(data.get("sources"), f"{where}.sources")
    if not sources:
        raise MergeKitConfigError(f"{where}.sources: must list at least one model")
    parsed = tuple(_source(s, f"{where}.sources[{j}]", slices=True) for j, s in enumerate(sources))
    lengths = {s.layer_range[1] - s.layer_range[0] for s in parsed if s.layer_range}
    if len(lengths) != 1:
        raise MergeKitConfigError(f"{where}.sources: every source of a slice must span the same number of layers, "
                                  f"got {', '.join(str(s.layer_range) for s in parsed)}")
    return Slice(parsed, _parameters(data.get("parameters"), f"{where}.parameters"), where)


def _dtype(value: Any, where: str) -> torch.dtype | None:
    if value is None:
        return None
    name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
    if name not in DTYPES:
        raise MergeKitConfigError(f"{where}: {value!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _parameters(data: Any, where: str) -> dict[str, Setting]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise MergeKitConfigError(f"{where}: must be a mapping of parameter name: value, got {type(data).__name__}")
    return {str(k): _setting(v, f"{where}.{k}") for k, v in data.items()}


def _scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str)) and not (isinstance(value, float) and not math.isfinite(value))


def _setting(value: Any, where: str) -> Setting:
    if _scalar(value):
        return value
    if isinstance(value, list) and value:
        if all(_scalar(v) for v in value):
            return tuple(value)
        if all(isinstance(v, Mapping) for v in value):
            conds = []
            for i, v in enumerate(value):
                _check_keys(v, {"value", "filter"}, f"{where}[{i}]")
                if "value" not in v:
                    raise MergeKitConfigError(f"{where}[{i}].value: required")
                inner = _setting(v["value"], f"{where}[{i}].value")
                if isinstance(inner, tuple) and inner and isinstance(inner[0], Conditional):
                    raise MergeKitConfigError(f"{where}[{i}].value: a conditional value cannot nest conditionals")
                flt = v.get("filter")
                if flt is not None and not isinstance(flt, str):
                    raise MergeKitConfigError(f"{where}[{i}].filter: must be text (part of a tensor name)")
                conds.append(Conditional(inner, flt))  # type: ignore[arg-type]
            return tuple(conds)
    raise MergeKitConfigError(f"{where}: must be a number, a list of numbers (a gradient over layers) or a list of "
                              f"`- filter: ... / value: ...` entries; got {value!r}")
