"""Running a MergeKit config: each output tensor merged by the registered method its parameters there call for,
streamed into sharded safetensors beside the donor's config and tokenizer files and a model card.

Parameters may change from tensor to tensor (gradients, filters), so the merge runs tensor by tensor: every output
tensor gets the method instance for its parameters (instances are shared between tensors with equal parameters) and
is merged by the engine's `merge_sources` over one-tensor views of its inputs, which rename a source layer to its
output layer and round inputs to the config's `dtype`. `out_dtype` (else `dtype`) is applied as tensors are written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mergebench_core.contract.registry as registry_module
from mergebench_core.contract.config import build_params
from mergebench_core.engine.checkpoint_files import copy_side_files
from mergebench_core.engine.data_free import merge_sources
from mergebench_core.engine.file_merges import CheckpointFiles, FiniteOnlySink
from mergebench_core.engine.safetensors_reader import SafetensorsSource
from mergebench_core.engine.sharded_writer import ShardedSafetensorsWriter
from mergebench_core.engine.stream import DEFAULT_BLOCK_ENTRIES
from mergebench_core.engine.tensor_math import is_mergeable
from mergebench_core.errors import MergebenchError, UnknownNameError
from mergebench_core.mergekit.card import adjust_model_config, model_card, write_text
from mergebench_core.mergekit.config import MergeKitConfig, MergeKitConfigError
from mergebench_core.mergekit.methods import KNOWN, PASSTHROUGH, MethodCall, TensorValues, generic_call, method_call
from mergebench_core.mergekit.models import allowed_roots, resolve_model
from mergebench_core.mergekit.plan import TensorPlan, effective_config, layer_total, plan_tensors
from mergebench_core.mergekit.settings import lookup, parameter_names

log = logging.getLogger(__name__)


@dataclass
class ConfigMerge:
    """What a config merge wrote."""

    files: list[Path]
    tensors: int
    layers: int
    methods: set[str] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)
    """Side files of the donor not copied (links leading outside its folder)."""


class OneTensorView:
    """Tensor `in_name` of `src` under the name `out_name`, rounded to `dtype` when that is given (floating only)."""

    def __init__(self, src: SafetensorsSource, in_name: str, out_name: str, dtype: torch.dtype | None):
        self.src, self.in_name, self.out_name = src, in_name, out_name
        self.name = f"{src.name}:{in_name}"
        own = src.dtype(in_name)
        self._dtype = dtype if dtype is not None and is_mergeable(own) else own

    def keys(self) -> list[str]:
        return [self.out_name]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.src.shape(self.in_name)

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype

    def get(self, key: str) -> torch.Tensor:
        return self.src.get(self.in_name).to(self._dtype)

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        """A block read straight from the file (rounded to `dtype` on the way): never the whole tensor per block."""
        own = self.src.dtype(self.in_name)
        if own == self._dtype:
            self.src.read_into(self.in_name, out, start)
        else:
            raw = torch.empty(out.numel(), dtype=own)
            self.src.read_into(self.in_name, raw, start)
            out.view(-1).copy_(raw)

    def read_slices(self, key: str, starts: Sequence[int], out: torch.Tensor) -> None:
        own = self.src.dtype(self.in_name)
        if own == self._dtype:
            self.src.read_slices(self.in_name, starts, out)
        else:
            raw = torch.empty(out.shape, dtype=own)
            self.src.read_slices(self.in_name, starts, raw)
            out.copy_(raw)


class CastingSink:
    """Hands tensors to `sink` in each key's output dtype (`out_dtype`)."""

    def __init__(self, sink: Any, dtypes: dict[str, torch.dtype]):
        self.sink, self.dtypes = sink, dtypes

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.sink.write(key, tensor.to(self.dtypes[key]))

    def write_block(self, key: str, start: int, values: torch.Tensor) -> None:
        self.sink.write_block(key, start, values.to(self.dtypes[key]))

    def patch(self, key: str, index: torch.Tensor | None, values: torch.Tensor) -> None:
        self.sink.patch(key, index, values.to(self.dtypes[key]))


def _places(config: MergeKitConfig) -> dict[str, str]:
    """Where each model is first named in the config."""
    out = {config.base_model: "base_model"} if config.base_model else {}
    for slc in config.slices:
        for src in slc.sources:
            out.setdefault(src.model, f"{src.where}.model")
    return out


def _calls(config: MergeKitConfig, plans: Sequence[TensorPlan]) -> list[MethodCall]:
    """The method call of every planned tensor, after refusing parameters the method does not take."""
    name = config.merge_method
    places = parameter_names(config)
    if name in KNOWN:
        for key, place in places.items():
            if key not in KNOWN[name]:
                raise MergeKitConfigError(f"{place}: {name} takes no parameter {key!r} (it takes "
                                          f"{', '.join(sorted(KNOWN[name]))})")
        build: Callable[[TensorValues], MethodCall] = lambda v: method_call(name, v)  # noqa: E731
    else:
        try:
            cls = registry_module.get_registry().method(name)
        except UnknownNameError as exc:
            raise MergeKitConfigError(f"merge_method: {exc}") from exc
        per_model = {k for slc in config.slices for src in slc.sources for k in src.parameters}
        glob = set(places) - per_model
        build = lambda v: generic_call(name, cls.Params, cls.requires_base, per_model, glob, v,  # noqa: E731
                                       optional_base=getattr(cls, "optional_base", False),
                                       defaults=getattr(cls, "mergekit_defaults", None))
    calls = []
    for plan in plans:
        slc = config.slices[plan.slice_index]
        base = next((j for j, s in enumerate(slc.sources) if s.model == config.base_model), None)
        values = TensorValues(
            plan.out_name,
            lambda key, p=plan: lookup(config, key, slice_index=p.slice_index, source_index=None,
                                       tensor_name=p.out_name, t=p.t),
            lambda j, key, p=plan: lookup(config, key, slice_index=p.slice_index, source_index=j,
                                          tensor_name=p.inputs[j][1], t=p.t),
            tuple(s.where for s in slc.sources), base)
        calls.append(build(values))
    return calls


def _method(call: MethodCall, cache: dict[MethodCall, Any], has_base: bool, n_experts: int) -> Any:
    key = MethodCall(call.method, call.params, None, ())
    if key not in cache:
        cls = registry_module.get_registry().method(call.method)
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in call.params}
        configs = build_params(cls.name, cls.Params, {cls.name: values})
        if len(configs) != 1:
            raise MergebenchError(f"{call.method}: a MergeKit config gives one value per parameter")
        refusal = cls.refusal(CheckpointFiles([f"model{i}" for i in range(n_experts)], has_base), configs[0])
        if refusal:
            raise MergebenchError(f"{cls.name} cannot merge these models: {refusal}")
        cache[key] = cls(configs[0])
    return cache[key]


def run_config(config: MergeKitConfig, config_path: str | os.PathLike[str], folder: str | os.PathLike[str], *,
               title: str, models_dirs: Sequence[str] = (), shard_bytes: int = 5 * 1000**3, seed: int = 0,
               device: str = "cpu", block_entries: int = DEFAULT_BLOCK_ENTRIES, prefetch: bool | None = None,
               progress: Callable[..., Iterator[Any]] | None = None) -> ConfigMerge:
    """Merge what `config` describes into `folder` (the caller stages it: `cli.merge_output.StagedOutput`), titled
    `title` in the model card; see the module docstring."""
    folder = Path(folder)
    roots = allowed_roots(config_path, models_dirs)
    paths = {ref: resolve_model(ref, where, roots) for ref, where in _places(config).items()}
    for ref, p in paths.items():
        if p.resolve() == folder.resolve():
            raise MergebenchError(f"--out {folder} is the folder of model {ref}; writing there would replace that "
                                  f"model's weights: choose another folder")
    sources = {ref: SafetensorsSource(p, name=ref) for ref, p in paths.items()}
    try:
        keys = {ref: src.keys() for ref, src in sources.items()}
        config = effective_config(config, keys)
        plans, layers = plan_tensors(config, keys)
        calls = _calls(config, plans)
        layout, out_dtypes = [], {}
        for plan in plans:
            src, name = sources[plan.inputs[0][0]], plan.inputs[0][1]
            own = src.dtype(name)
            dtype = (config.out_dtype or config.dtype or own) if is_mergeable(own) else own
            layout.append((plan.out_name, src.shape(name), dtype))
            out_dtypes[plan.out_name] = dtype
        donor = config.base_model or config.slices[0].sources[0].model
        result = ConfigMerge([], len(plans), layers)
        metadata = {"format": "pt", "mergebench_mergekit_method": config.merge_method}
        folder.mkdir(parents=True, exist_ok=True)
        writer = ShardedSafetensorsWriter(folder, layout, shard_bytes, metadata)
        sink = FiniteOnlySink(CastingSink(writer, out_dtypes), config.merge_method, folder)  # type: ignore[arg-type]
        cache: dict[MethodCall, Any] = {}
        try:
            pairs = list(zip(plans, calls))
            iterator = progress(pairs, desc=f"merging ({config.merge_method})", total=len(pairs)) \
                if progress else pairs
            for plan, call in iterator:
                views = [OneTensorView(sources[m], n, plan.out_name, config.dtype) for m, n in plan.inputs]
                result.methods.add(call.method)
                if call.method == PASSTHROUGH:
                    value = views[0].get(plan.out_name)
                    scale = dict(call.params)["scale"]
                    sink.write(plan.out_name, value * scale if scale != 1.0 and value.is_floating_point()
                               else value)
                    continue
                base = views[call.base] if call.base is not None else None
                method = _method(call, cache, base is not None, len(call.experts))
                merge_sources(method, base, [views[j] for j in call.experts], sink=sink, seed=seed,
                              device=device, block_entries=block_entries, prefetch=prefetch)
            result.files = writer.commit()
        except BaseException:
            writer.abort()
            raise
        if paths[donor].is_dir():
            result.skipped = copy_side_files(paths[donor], folder)
        donor_layers = layer_total(keys[donor])
        adjust_model_config(folder / "config.json", layers if layers != donor_layers else None,
                            config.out_dtype or config.dtype)
        shown = sorted(m for m in result.methods if m != PASSTHROUGH) or [PASSTHROUGH]
        write_text(folder / "README.md", model_card(config, ", ".join(shown), title))
        log.info("merged %d tensors (%d layers) into %s", len(plans), layers, folder)
        return result
    finally:
        for src in sources.values():
            src.close()
