"""CLIP zero-shot classification task pools: TA8, TA14 and TA20 for the ViT-B/32, B/16 and L/14 base models.

The model being scored is a vision tower (`CLIPVisionModel`, what the CLIP model pools merge). Its pooled output
goes through the *pretrained* visual projection and is compared with zero-shot heads built from the pretrained
text tower, as FusionBench does. Inputs handed out by `batches` are uint8 pixels from the decode-once cache
(`pixels.py`); `logits` rescales and normalises them on the model's device, so callers pass them through untouched
(already-normalised float inputs are accepted as they are).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core import TaskPool
from mergebench_core.data.splits import validation_indices
from mergebench_core.paths import cache_dir
from mergebench_core.pools import hub

from .catalog import BASE_MODELS, TaskSpec, suite, task
from .heads import HeadCache, ProjectionSide
from .pixels import CachedSplit, PixelCache, PixelKey, processor_digest

log = logging.getLogger(__name__)

DATA_DIR_ENV = "MERGEBENCH_CLIP_DATA_DIR"
"""`$MERGEBENCH_CLIP_DATA_DIR/<dataset id>[/<config>]/<split>`: local `save_to_disk` copies used before the hub's."""


def taskpool_name(size: str, suite_name: str) -> str:
    return f"clip-zeroshot-vit-{size}_{suite_name}"


class CLIPZeroShotTaskPool(TaskPool):
    """Accuracy and loss of a CLIP vision tower on each task's test split, through pretrained zero-shot heads."""

    def __init__(self, size: str = "b32", suite_name: str = "TA8", *, tasks: list[str] | None = None,
                 base_model: str | None = None, cache_root: Path | None = None):
        self.size, self.suite = size, suite_name
        self.name = taskpool_name(size, suite_name)
        self.base_model = base_model or BASE_MODELS[size]
        self._tasks = list(tasks) if tasks is not None else suite(suite_name)
        self.specs: dict[str, TaskSpec] = {t: task(t) for t in self._tasks}
        self._cache_root = cache_root
        self._on_device: dict[tuple[str, str], torch.Tensor] = {}

    # -- resources ----------------------------------------------------------------------------------------------
    @property
    def cache_root(self) -> Path:
        return self._cache_root or cache_dir() / "clip"

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def _dataset_needs(self, splits: tuple[str, ...] = ("test",)) -> list[tuple[TaskSpec, str]]:
        return [(s, s.split_name(sp)) for s in self.specs.values() for sp in splits]

    def _missing(self, splits: tuple[str, ...]) -> list[str]:
        model = [] if hub.model_snapshot(self.base_model) else [f"model {self.base_model}"]
        return model + [hub.describe_dataset(s.dataset, s.config, split) for s, split in self._dataset_needs(splits)
                        if not hub.dataset_available(s.dataset, s.config, split, local_env=DATA_DIR_ENV)]

    def missing_resources(self) -> list[str]:
        """Offline only: the base model and test splits that are in neither the hub cache nor a local copy."""
        return self._missing(("test",)) if hub.offline() else []

    def download(self, progress: hub.Progress | None = None) -> None:
        """Prefetch the base model and the test and train splits of every task into the Hugging Face caches;
        offline, refuse at once naming whatever is still missing."""
        hub.require_online(self._missing(("test", "train")), local_env=DATA_DIR_ENV)
        hub.download_model(self.base_model, progress)
        for spec, split in self._dataset_needs(("test", "train")):
            hub.download_dataset(spec.dataset, spec.config, split, progress, local_env=DATA_DIR_ENV)

    def version_info(self) -> dict[str, str]:
        return {"clip_base": f"{self.base_model}@{hub.model_revision(self.base_model)}"}

    # -- the image side -----------------------------------------------------------------------------------------
    @cached_property
    def image_processor(self) -> Any:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor.from_pretrained(hub.model_location(self.base_model))

    @cached_property
    def _normalizer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) with normalised = uint8 * scale - shift, per channel."""
        p = self.image_processor
        mean = torch.tensor(p.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(p.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        return float(p.rescale_factor) / std, mean / std

    @cached_property
    def heads(self) -> HeadCache:
        def load_clip() -> tuple:
            from transformers import AutoTokenizer, CLIPModel

            location = hub.model_location(self.base_model)
            return CLIPModel.from_pretrained(location).eval(), AutoTokenizer.from_pretrained(location)

        return HeadCache(self.cache_root / "heads", self.base_model, hub.model_revision(self.base_model), load_clip)

    @cached_property
    def projection(self) -> ProjectionSide:
        return self.heads.projection()

    def head(self, task_name: str) -> torch.Tensor:
        return self.heads.head(self.specs[task_name])

    # -- data ---------------------------------------------------------------------------------------------------
    @cached_property
    def pixel_cache(self) -> PixelCache:
        return PixelCache(self.cache_root / "pixels")

    def _key(self, spec: TaskSpec, split: str) -> PixelKey:
        revision = hub.dataset_revision(spec.dataset, spec.config, split, local_env=DATA_DIR_ENV)
        return PixelKey(spec.dataset, spec.config, revision, split, processor_digest(self.image_processor))

    def split(self, task_name: str, split: str = "test", limit: int | None = None) -> CachedSplit:
        """The preprocessed split from the pixel cache, decoding it first if this is its first use."""
        if task_name not in self.specs:
            raise KeyError(f"task pool {self.name!r} has no task {task_name!r}; tasks: {', '.join(self._tasks)}")
        spec = self.specs[task_name]
        name = spec.split_name(split)
        key = self._key(spec, name)
        found = self.pixel_cache.find(key, limit)
        if found is not None:
            return found
        return self.pixel_cache.build(key, lambda: hub.open_dataset(spec.dataset, spec.config, name,
                                                                    local_env=DATA_DIR_ENV),
                                      self.image_processor, spec.image_column, spec.label_column, limit)

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if split == "val":
            return self._val_batches(task, batch_size, limit)
        return self.split(task, split, limit).batches(batch_size, limit, pin=torch.cuda.is_available())

    def _val_batches(self, task: str, batch_size: int,
                     limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """"val": the core's fixed 10 % of the whole train split, read from its memory map a batch at a time."""
        train = self.split(task, "train")
        index = validation_indices(len(train)).numpy()
        if limit is not None:
            index = index[:limit]
        for i in range(0, len(index), batch_size):
            rows = index[i:i + batch_size]
            yield (torch.from_numpy(np.asarray(train.pixels[rows])),
                   torch.from_numpy(train.labels[rows].astype(np.int64)))

    def num_examples(self, task: str, split: str = "test") -> int | None:
        spec = self.specs[task]
        if split == "val":
            train = self.num_examples(task, "train")
            return len(validation_indices(train)) if train else None
        found = self.pixel_cache.find(self._key(spec, spec.split_name(split)))
        return len(found) if found is not None else None

    # -- logits -------------------------------------------------------------------------------------------------
    def _cached(self, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`tensor` on `device`, kept for later calls. Kept as an ordinary tensor even when first asked for under
        `torch.inference_mode()` (an evaluation): test-time methods (AdaMerging, WEMoE, ...) later backpropagate
        through the projection and heads, and autograd refuses inference tensors."""
        key = (name, str(device))
        if key not in self._on_device:
            with torch.inference_mode(False):
                moved = tensor.to(device)
                self._on_device[key] = moved.clone() if moved.is_inference() else moved
        return self._on_device[key]

    def normalize(self, inputs: torch.Tensor) -> torch.Tensor:
        """uint8 pixels from `batches` -> the processor's normalised float32 pixels (floats pass through)."""
        if inputs.is_floating_point():
            return inputs
        scale, shift = self._normalizer
        device = inputs.device
        return inputs.float() * self._cached("scale", scale, device) - self._cached("shift", shift, device)

    def image_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled output of the vision tower, in float32 (bf16 autocast on CUDA, the model's dtype elsewhere)."""
        if pixels.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(pixel_values=pixels)
        else:
            param = next(model.parameters(), None)
            out = model(pixel_values=pixels.to(param.dtype) if param is not None else pixels)
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        return pooled.float()

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        device = inputs.device
        pooled = self.image_features(model, self.normalize(inputs))
        proj = self._cached("proj", self.projection.visual_projection, device)
        embeds = F.normalize(pooled @ proj.T, dim=-1)
        head = self._cached(f"head/{task}", self.head(task), device)
        return self.projection.logit_scale.exp().item() * embeds @ head.T
