"""How a row names its configuration: the method, then the parameters that differ from its defaults, the preference,
an evaluation limit, a seed.

Tables, figures and Pareto fronts share these rules so that one configuration reads the same everywhere. Defaults come
from the installed method (its `Params()`); for a method that is no longer installed, the parameters that vary between
its rows stand in for them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Protocol

from mergebench_core.errors import MergebenchError

REFERENCE_LABELS = {"pretrained": "Pretrained", "individual": "Individual (experts)"}
TASK_SPECIFIC_MARK = "†"
TASK_SPECIFIC_NOTE = "one model per task (not a single static merge)"
LABEL_VALUE_WIDTH = 24
"""Parameter values longer than this are shortened in labels (with …); CSV, JSON and HTML details keep them whole."""

Defaults = Callable[[str], "dict[str, Any] | None"]
"""A method's name -> its default parameters, or None when they are unknown (see `installed_defaults`)."""


def canonical(value: Any) -> str:
    """One spelling per value, so that parameters compare equal however their dicts were ordered."""
    return json.dumps(value, sort_keys=True, default=str)


def reference_label(method: str) -> str:
    return REFERENCE_LABELS.get(method, method[0].upper() + method[1:] if method else method)


def preference_label(preference: Sequence[float] | None) -> str:
    return "" if preference is None else "r=(" + ", ".join(f"{v:.3g}" for v in preference) + ")"


def installed_defaults(method: str) -> dict[str, Any] | None:
    """The installed method's default parameters (`Params()`), or None when it is not installed or has no defaults."""
    try:
        from mergebench_core.contract.registry import get_registry

        reg = get_registry().methods.get(method)
        if reg is None:
            return None
        return asdict(reg.obj.Params())
    except (TypeError, ValueError, MergebenchError):
        # Params with required fields, or whose defaults refuse this installation (a default base method that is not
        # installed, while the run named another): show what varies
        return None


def short_value(value: Any) -> str:
    """A parameter value as a label shows it: 0.1, 1e-05, mean, [0.2,0.8], none."""
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
        return "none" if value is None else text
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= LABEL_VALUE_WIDTH else text[:LABEL_VALUE_WIDTH - 1] + "…"


def settings_text(params: Mapping[str, Any]) -> str:
    """`(k=0.1, combine=mean)`: every parameter given, shortened like a label's."""
    return "(" + ", ".join(f"{k}={short_value(v)}" for k, v in params.items()) + ")"


def shown_parameters(params: Mapping[str, Any], defaults: Mapping[str, Any] | None,
                     siblings: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The parameters a label names: those that differ from `defaults`, or, when the defaults are unknown, those
    whose value differs between `siblings` (every parameter set of the same method shown beside this one)."""
    if defaults is not None:
        return {k: v for k, v in params.items() if k not in defaults or canonical(v) != canonical(defaults[k])}
    keys = list(dict.fromkeys(k for s in siblings for k in s))
    varying = [k for k in keys if len({canonical(s.get(k)) for s in siblings}) > 1]
    return {k: params[k] for k in varying if k in params}


class Configured(Protocol):
    """What `front_labels` reads of a front (`preferences.pareto.FrontSummary` has it)."""

    method: str
    params: dict[str, Any]
    seed: int


def front_labels(fronts: Sequence[Configured], defaults: Defaults | None = None) -> list[str]:
    """A label per front, in order: the method, its non-default parameters (see `shown_parameters`), and the seed
    when it is not 0 or the same configuration was run at several seeds — the leaderboard's rules, so a front and
    its table row read the same."""
    defaults = defaults or installed_defaults
    labels = []
    for f in fronts:
        same = [g for g in fronts if g.method == f.method]
        shown = shown_parameters(f.params, defaults(f.method), [g.params for g in same])
        seeds = {g.seed for g in same if canonical(g.params) == canonical(f.params)}
        parts = [f"{k}={short_value(v)}" for k, v in shown.items()]
        if f.seed != 0 or len(seeds) > 1:
            parts.append(f"seed={f.seed}")
        labels.append(f"{f.method} ({', '.join(parts)})" if parts else f.method)
    return labels
