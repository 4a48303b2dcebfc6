"""Helpers for tests of merging methods: the task-vector pipeline computed the plain way.

`reference_merge` writes every stage of `pipeline.Pipeline` directly over whole tensors of a model held in memory, so
tests can compare the streaming engine (blocks, samples, devices) against it bit for bit. It is test code: the
library never imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mergebench_core.engine.exact_topk import topk_mask
from mergebench_core.engine.task_vector_stages import StageSettings, apply, drop_keep, max_magnitude


class PipelineSettings(StageSettings, Protocol):
    """What the reference reads of a `pipeline.Pipeline` (a protocol: the pipeline module points old imports of the
    reference here, so this module must not import it)."""

    @property
    def keep(self) -> float: ...

    @property
    def skip_top(self) -> float: ...

    @property
    def scope(self) -> str: ...

    @property
    def weights(self) -> tuple[float, ...] | None: ...

    @property
    def scale(self) -> float: ...

    @property
    def trims(self) -> bool: ...

    def counts(self, n: int, tasks: int) -> list[int]: ...


@dataclass
class ReferenceTensor:
    """What the reference pipeline computes for one tensor."""

    taus: torch.Tensor
    """(T, *shape): the task vectors after the drop, untrimmed."""
    trimmed: torch.Tensor
    """(T, *shape): after the trim and the weights."""
    sign: torch.Tensor | None
    """(*shape): the elected sign (±1), None without election."""
    merged: torch.Tensor
    """(*shape): the combined vector."""


def reference_merge(pipe: PipelineSettings, base: Mapping[str, torch.Tensor],
                    experts: Sequence[Mapping[str, torch.Tensor]], *, seed: int = 0) -> dict[str, ReferenceTensor]:
    """The pipeline written directly over the whole model held in memory: every floating-point tensor of `base`.

    Independent of the streaming code except for `drop_keep` (the random draws must be the same ones), `topk_mask`
    (exact top-k by a stable sort) and the order of additions, so the two agree bit for bit.
    """
    keys = [k for k, v in base.items() if v.is_floating_point()]
    tasks = len(experts)
    taus = {}
    for key in keys:
        b = base[key].to(torch.float32)
        tau = torch.stack([e[key].to(torch.float32) - b for e in experts]).reshape(tasks, -1)
        if pipe.drop > 0.0:
            factor = 1.0 / (1.0 - pipe.drop) if pipe.rescale else 1.0
            for t in range(tasks):
                tau[t] = tau[t] * (drop_keep(seed, key, t, range(tau.shape[1]), pipe.drop) * factor)
        taus[key] = tau
    masks = {key: torch.ones_like(taus[key]) for key in keys}
    if pipe.trims:
        groups = [keys] if pipe.scope == "global" else [[key] for key in keys]
        for group in groups:
            flat = torch.cat([taus[key] for key in group], 1)
            n = flat.shape[1]
            counts = pipe.counts(n, tasks)
            mask = torch.stack([topk_mask(flat[t], counts[t]) for t in range(tasks)])
            if pipe.skip_top > 0.0:
                mask &= ~torch.stack([topk_mask(flat[t], counts[tasks + t]) for t in range(tasks)])
            offset = 0
            for key in group:
                width = taus[key].shape[1]
                masks[key] = mask[:, offset:offset + width].to(torch.float32)
                offset += width
    weights = torch.tensor(pipe.weights if pipe.weights is not None else [1.0] * tasks).view(-1, 1)
    out = {}
    for key in keys:
        shape = base[key].shape
        unweighted = taus[key] * masks[key]
        trimmed = unweighted * weights if pipe.weights is not None else unweighted
        sign = None
        if not pipe.elect:
            merged = max_magnitude(trimmed) if pipe.combine == "max" else _sum_in_order(trimmed)
        else:
            voters = unweighted if pipe.elect_on == "unweighted" else trimmed
            total = _sum_in_order(torch.where(voters > 0, voters, 0.0)) + _sum_in_order(torch.where(voters < 0, voters,
                                                                                                     0.0))
            sign = torch.where(total >= 0, 1.0, -1.0)
            agree = (trimmed * sign) > 0
            if pipe.combine == "max":
                merged = sign * (trimmed.abs() * agree).amax(0)
            else:
                merged = _sum_in_order(torch.where(agree, trimmed, torch.zeros_like(trimmed)))
                if pipe.combine == "mean":
                    merged = merged / _sum_in_order(agree.to(torch.float32)).clamp(min=1)
        out[key] = ReferenceTensor(taus[key].view(tasks, *shape), trimmed.view(tasks, *shape),
                                   None if sign is None else sign.view(shape), merged.view(shape))
    return out


def _sum_in_order(x: torch.Tensor) -> torch.Tensor:
    total = torch.zeros_like(x[0]) if len(x) else torch.zeros(x.shape[1:])
    for i, row in enumerate(x):
        total = row.clone() if i == 0 else total + row
    return total


def reference_outputs(pipe: PipelineSettings, base: Mapping[str, torch.Tensor],
                      experts: Sequence[Mapping[str, torch.Tensor]], *, seed: int = 0,
                      output: Callable[[str, torch.Tensor, ReferenceTensor], torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """θ_0 + scale · merged per tensor (or `output(key, base, reference)`), in the base's dtype: what a pipeline
    method with the default `output` writes."""
    result = {}
    for key, ref in reference_merge(pipe, base, experts, seed=seed).items():
        value = output(key, base[key], ref) if output is not None else apply(base[key], ref.merged, pipe.scale)
        result[key] = value.to(base[key].dtype)
    return result


def fusionbench_module(package: str, module: str):  # noqa: ANN201 - a module of an optional package
    """`fusion_bench.method.<package>.<module>` for parity tests, loaded without its package's `__init__`, which imports
    FusionBench's CLIP task pools (they fail with recent transformers) although the algorithm module does not need
    them; Ray actor wrappers are switched off (`ray.remote` rewrites the class's signature when Ray is installed).
    Raises ImportError when FusionBench is absent, so callers can skip."""
    import importlib
    import sys
    import types
    from pathlib import Path

    import fusion_bench.method as methods
    import fusion_bench.utils.packages as packages

    packages.is_ray_available = lambda: False
    name = f"fusion_bench.method.{package}"
    if name not in sys.modules:
        stub = types.ModuleType(name)
        stub.__path__ = [str(Path(methods.__file__).parent / package)]
        sys.modules[name] = stub
    return importlib.import_module(f"{name}.{module}")
