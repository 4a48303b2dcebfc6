"""CLIP vision-tower pools from the Hugging Face hub, as FusionBench defines them (clip-vit-b32_TA8, ...).

The pretrained model is `openai/clip-vit-<size>`; expert t is `tanganke/clip-vit-<size>_<t>`. Only the vision tower
(`CLIPVisionModel`: embeddings, encoder, pre- and post-LayerNorm) is merged; the visual projection and the text
tower stay with the pretrained model, on the task pool's side. Models load one at a time from the hub cache, and
data-free methods read them tensor by tensor from their safetensors files without building the module.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import cached_property

import torch
from torch import nn

from mergebench_core import PRETRAINED, CheckpointError, ModelPool
from mergebench_core.engine.tensors import SafetensorsSource, StateDictSource, TensorSource
from mergebench_clip_tasks import BASE_MODELS, hub, suite, taskpool_name

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[value]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Loading a vision tower from a full CLIP checkpoint reports every text-tower key as unexpected; that is the
    point of loading only the vision tower, so the report is silenced."""
    from transformers.utils import logging as hf_logging

    before, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()


class VisionTowerSource:
    """The vision-tower tensors of a CLIP checkpoint, under the names `CLIPVisionModel.state_dict()` uses.

    Checkpoint files name them `vision_model.<key>` (both full CLIPModel and CLIPVisionModel checkpoints); the module
    may or may not carry that prefix depending on the transformers version, so the mapping is built from the module's
    own key list.
    """

    def __init__(self, files: SafetensorsSource, module_keys: list[str], name: str):
        self.files, self.name = files, name
        present = set(files.keys())
        self._map: dict[str, str] = {}
        for k in module_keys:
            for candidate in (k, f"vision_model.{k}", k.removeprefix("vision_model.")):
                if candidate in present:
                    self._map[k] = candidate
                    break
            else:
                raise CheckpointError(f"{name}: the checkpoint has no tensor for the vision-tower key {k!r}")

    def keys(self) -> list[str]:
        return list(self._map)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files.shape(self._map[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.files.dtype(self._map[key])

    def get(self, key: str) -> torch.Tensor:
        return self.files.get(self._map[key])


class CLIPVisionPool(ModelPool):
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
        import transformers
        from transformers import CLIPVisionModel

        location = hub.model_location(self.repo_id(name))
        kwargs = {}
        if self.dtype is not None:  # transformers 5 renamed torch_dtype to dtype
            kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = self.dtype
        with quiet_transformers():
            model = CLIPVisionModel.from_pretrained(location, **kwargs)
        return model.eval()

    @cached_property
    def _module_keys(self) -> list[str]:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig.from_pretrained(hub.model_location(self.base_model))
        with torch.device("meta"):
            return list(CLIPVisionModel(config).state_dict())

    def tensor_source(self, name: str) -> TensorSource:
        """Lazy, tensor-by-tensor access to a model's vision tower (its state dict when the repo has no safetensors)."""
        location = hub.model_location(self.repo_id(name))
        label = f"{self.repo_id(name)}"
        try:
            files = SafetensorsSource(location, name=label)
        except CheckpointError:
            return StateDictSource(self.load_model(name).state_dict(), label)
        return VisionTowerSource(files, self._module_keys, label)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        src = self.tensor_source(name)
        return {k: src.get(k) for k in src.keys()}

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
        hub.require_hub([f"model {r}" for r in self.repo_ids() if hub.model_snapshot(r) is None])
        for repo in self.repo_ids():
            hub.download_model(repo, progress)
