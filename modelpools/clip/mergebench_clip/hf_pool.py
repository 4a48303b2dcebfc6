"""CLIP vision-tower pools from the Hugging Face hub, as FusionBench defines them (clip-vit-b32_TA8, ...).

The pretrained model is `openai/clip-vit-<size>`; expert t is `tanganke/clip-vit-<size>_<t>`. Only the vision tower
(`CLIPVisionModel`: embeddings, encoder, pre- and post-LayerNorm) is merged; the visual projection and the text
tower stay with the pretrained model, on the task pool's side. Models load one at a time from the hub cache, and
data-free methods read them tensor by tensor from their safetensors files without building the module.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import torch
from mergebench_clip_tasks import BASE_MODELS, suite, taskpool_name
from torch import nn

from mergebench_core import PRETRAINED, CheckpointError
from mergebench_core.engine.sources import StateDictSource, TensorSource
from mergebench_core.pools import hub
from mergebench_core.pools.folder import CheckpointPool, RenamedSource
from mergebench_core.pools.hf_models import dtype_kwargs, parse_dtype, quiet_transformers

log = logging.getLogger(__name__)

VISION_PREFIX = "vision_model."
"""Checkpoint files name the vision tower `vision_model.<key>` (full CLIPModel and CLIPVisionModel checkpoints
alike); `CLIPVisionModel.state_dict()` may or may not carry that prefix depending on the transformers version, so
its keys are looked up with and without it."""


class CLIPVisionPool(CheckpointPool):
    """The pretrained CLIP vision tower and one fine-tuned tower per task of a suite."""

    has_pretrained = True

    def __init__(self, size: str = "b32", suite_name: str = "TA8", *, dtype: str | torch.dtype | None = None):
        if size not in BASE_MODELS:
            raise ValueError(f"unknown CLIP size {size!r}; known: {', '.join(BASE_MODELS)}")
        self.size, self.suite = size, suite_name
        self.name = f"clip-vit-{size}_{suite_name}"
        self.default_taskpool = taskpool_name(size, suite_name)
        self.base_model = BASE_MODELS[size]
        self._tasks = suite(suite_name)
        self.dtype = parse_dtype(dtype)

    def configure(self, *, dtype: str | None = None, trust_pickle: bool = False) -> None:
        if dtype is not None:
            self.dtype = parse_dtype(dtype)

    @property
    def expert_names(self) -> list[str]:
        return list(self._tasks)

    def repo_id(self, name: str) -> str:
        if name == PRETRAINED:
            return self.base_model
        if name not in self._tasks:
            raise KeyError(f"pool {self.name!r} has no model {name!r}; models: {PRETRAINED}, {', '.join(self._tasks)}")
        return f"tanganke/{self.base_model.split('/')[1]}_{name}"

    def repo_ids(self) -> list[str]:
        return [self.repo_id(n) for n in (PRETRAINED, *self._tasks)]

    # -- loading ------------------------------------------------------------------------------------------------
    def load_model(self, name: str) -> nn.Module:
        from transformers import CLIPVisionModel

        location = hub.model_location(self.repo_id(name))
        with quiet_transformers():
            model = CLIPVisionModel.from_pretrained(location, **dtype_kwargs(self.dtype))
        return model.eval()

    @cached_property
    def _module_keys(self) -> list[str]:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig.from_pretrained(hub.model_location(self.base_model))
        with torch.device("meta"):
            return list(CLIPVisionModel(config).state_dict())

    def checkpoint_path(self, name: str) -> Path:
        return Path(hub.model_location(self.repo_id(name)))

    def source_name(self, name: str) -> str:
        return self.repo_id(name)

    def stored_tensors(self, name: str) -> TensorSource:
        """The checkpoint's safetensors, read lazily; a repository without them is loaded once and its state dict
        handed out."""
        try:
            return super().stored_tensors(name)
        except CheckpointError:
            return StateDictSource(self.load_model(name).state_dict(), self.source_name(name))

    def module_tensors(self, name: str, stored: TensorSource) -> TensorSource:
        """Only the vision tower, under `CLIPVisionModel`'s own names."""
        return RenamedSource.for_module(stored, self._module_keys, self.source_name(name),
                                        prefixes=("", VISION_PREFIX), strip=(VISION_PREFIX,))

    # -- provenance and resources -------------------------------------------------------------------------------
    def identity(self, name: str) -> str:
        repo = self.repo_id(name)
        return f"{repo}@{hub.model_revision(repo)}"

    def version_info(self) -> dict[str, str]:
        return {"clip_models": ",".join(f"{r}@{hub.model_revision(r)[:12]}" for r in self.repo_ids())}

    def missing_resources(self) -> list[str]:
        """Offline only: the models of the pool that are not in the Hugging Face cache."""
        if not hub.offline():
            return []
        return [f"model {r}" for r in self.repo_ids() if hub.model_snapshot(r) is None]

    def download(self, progress: hub.Progress | None = None) -> None:
        """Fetch every model of the pool; offline, refuse at once naming whatever is still missing."""
        hub.require_online([f"model {r}" for r in self.repo_ids() if hub.model_snapshot(r) is None])
        for repo in self.repo_ids():
            hub.download_model(repo, progress)
