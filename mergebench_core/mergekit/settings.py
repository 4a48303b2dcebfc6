"""A MergeKit parameter's value at one tensor: gradients interpolated over layers, `filter:` matched by name.

These are MergeKit's rules, kept exactly so that a config means the same number in both tools:
- a list of numbers is a gradient: at position t in [0, 1] (a layer's place within its slice) the value is the
  linear interpolation between the two neighbouring entries of the list spread evenly over [0, 1];
- a list of other scalars (text, booleans mixed with numbers) is a step: entry int(t · (n − 1));
- a list of `filter/value` entries takes the first whose filter is missing, "*", or a substring of the tensor's
  name;
- a parameter is looked up in the model's own `parameters` (a slice source's, or a `models:` entry's), then the
  slice's, then the top level's; the first that yields a value wins.
"""

from __future__ import annotations

from collections.abc import Mapping

from mergebench_core.mergekit.config import Conditional, MergeKitConfig, Scalar, Setting


def evaluate(setting: Setting, tensor_name: str, t: float) -> Scalar | None:
    """The value of `setting` for tensor `tensor_name` at layer position `t`, or None when no filter matches."""
    if not isinstance(setting, tuple):
        return setting
    if all(isinstance(e, (int, float)) for e in setting):  # booleans count as numbers, as in MergeKit
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]  # type: ignore[operator]
    if not any(isinstance(e, Conditional) for e in setting):
        return setting[int(t * (len(setting) - 1))]  # type: ignore[return-value]
    for cond in setting:
        assert isinstance(cond, Conditional)
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate(cond.value, tensor_name, t)
    return None


def lookup(config: MergeKitConfig, name: str, *, slice_index: int, source_index: int | None, tensor_name: str,
           t: float) -> Scalar | None:
    """Parameter `name` for one tensor: of one model (`source_index` within the slice) or, with None, of the merge
    as a whole (which skips every model's own parameters)."""
    layers: list[Mapping[str, Setting]] = []
    slc = config.slices[slice_index]
    if source_index is not None:
        layers.append(slc.sources[source_index].parameters)
    layers += [slc.parameters, config.parameters]
    for params in layers:
        if name in params:
            value = evaluate(params[name], tensor_name, t)
            if value is not None:
                return value
    return None


def parameter_names(config: MergeKitConfig) -> dict[str, str]:
    """Every parameter name the config sets, with the first place it is set (for refusals by key)."""
    out: dict[str, str] = {}
    for name in config.parameters:
        out.setdefault(name, f"parameters.{name}")
    for slc in config.slices:
        for name in slc.parameters:
            out.setdefault(name, f"{slc.where}.parameters.{name}")
        for src in slc.sources:
            for name in src.parameters:
                out.setdefault(name, f"{src.where}.parameters.{name}")
    return out
