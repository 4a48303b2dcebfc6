"""The OpenCLIP checkpoints of the task-vectors paper (Ilharco et al., ICLR 2023) as model pools, from a local folder.

Layout, as the paper's release unpacks (set $MERGEBENCH_OPENCLIP_DIR to the folder that holds `ViT-B-32/` etc.):

    <dir>/ViT-B-32/zeroshot.pt                  the pretrained image encoder
    <dir>/ViT-B-32/<Dataset>/finetuned.pt       one expert per task (Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45,
                                                SUN397, SVHN)
    <dir>/ViT-B-32/head_<Dataset>.pt            zero-shot heads (weights already scaled by the logit scale)

Those files are pickled Python objects (`src.modeling.ImageEncoder` wrapping an open_clip model). Unpickling runs
code from the file, so it happens only with an explicit opt-in (`--trust-pickle`, or MERGEBENCH_TRUST_PICKLE=1), and
`mergebench convert --modelpool openclip-vit-b32_TA8 --trust-pickle` writes a `.safetensors` beside each file once;
later runs read those and never unpickle. Reading tensors needs no open_clip; rebuilding the image tower to evaluate
it does (`pip install mergebench-clip[openclip]`).

Only the image tower (`model.visual.*`, including its projection, which the paper fine-tunes) is merged. The task
pool (`openclip-zeroshot-vit-b32_TA8`) scores it with the released heads on the same decode-once pixel caches as the
Hugging Face pools: the OpenAI preprocessing (bicubic resize to 224, center crop, CLIP mean/std) of
`openai/clip-vit-base-patch32`'s processor, which open_clip's `openai` transform matches up to resize rounding.
"""

from __future__ import annotations

import logging
import os
import pickle
import types
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mergebench_clip_tasks import CLIPZeroShotTaskPool, suite

from mergebench_core import PRETRAINED, CheckpointError, MergebenchError
from mergebench_core.engine.pickle_checkpoints import (
    TRUST_PICKLE_ENV,
    convert_pickle_checkpoint,
    read_pickle_checkpoint,
)
from mergebench_core.engine.safetensors_reader import SafetensorsSource
from mergebench_core.engine.sources import StateDictSource, TensorSource
from mergebench_core.pools.folder import CheckpointPool, RenamedSource

log = logging.getLogger(__name__)

DIR_ENV = "MERGEBENCH_OPENCLIP_DIR"
ARCHS = {"b32": "ViT-B-32", "b16": "ViT-B-16", "l14": "ViT-L-14"}
FOLDERS = {"sun397": "SUN397", "stanford-cars": "Cars", "resisc45": "RESISC45", "eurosat": "EuroSAT",
           "svhn": "SVHN", "gtsrb": "GTSRB", "mnist": "MNIST", "dtd": "DTD"}
"""mergebench task name -> the task-vectors release's dataset folder name."""
VISUAL_PREFIXES = ("model.visual.", "visual.")


def _env_trust() -> bool:
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _Stub(nn.Module):
    """Stands in for the task-vectors repo's classes (`src.modeling.*`) while unpickling: only their state matters."""

    def forward(self, *args: object) -> None:  # pragma: no cover - never called
        raise RuntimeError("a stub module from an unpickled task-vectors checkpoint cannot be run")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        if module.startswith("src.") or module in ("modeling", "heads"):
            return _Stub
        return super().find_class(module, name)


TASK_VECTORS_PICKLE = types.SimpleNamespace(Unpickler=_Unpickler, load=pickle.load, __name__="task_vectors_pickle")
"""A `pickle_module` for torch.load that maps the task-vectors repo's classes to stubs (open_clip stays real)."""


class OpenCLIPFolder:
    """The files of one architecture in a task-vectors release folder, and the opt-in that guards their pickles."""

    def __init__(self, size: str, root: str | os.PathLike[str] | None = None, trust_pickle: bool | None = None):
        self.size, self.arch = size, ARCHS[size]
        self._root = Path(root) if root is not None else None
        self.trust_pickle = _env_trust() if trust_pickle is None else trust_pickle

    @property
    def root(self) -> Path:
        if self._root is not None:
            return self._root
        value = os.environ.get(DIR_ENV)
        if not value:
            raise MergebenchError(f"the OpenCLIP pools read the task-vectors checkpoints from a local folder; set "
                                  f"{DIR_ENV} to the folder that holds {self.arch}/zeroshot.pt")
        return Path(value).expanduser()

    def pickle_path(self, name: str) -> Path:
        folder = self.root / self.arch
        if name == PRETRAINED:
            return folder / "zeroshot.pt"
        if name.startswith("head:"):
            return folder / f"head_{FOLDERS[name[5:]]}.pt"
        return folder / FOLDERS[name] / "finetuned.pt"

    def files(self, names: list[str]) -> list[Path]:
        return [self.pickle_path(n) for n in names]

    def tensors(self, name: str) -> TensorSource:
        """Every tensor of a checkpoint: from its converted safetensors, else (opted in) by unpickling it."""
        path = self.pickle_path(name)
        converted = path.with_suffix(".safetensors")
        if converted.is_file():
            return SafetensorsSource(converted, name=str(converted))
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist (and no converted {converted.name} beside it)")
        if not self.trust_pickle:
            raise CheckpointError(f"{path} is a pickle checkpoint and unpickling can run code from the file. If you "
                                  f"trust it, pass --trust-pickle (or {TRUST_PICKLE_ENV}=1), or convert it once: "
                                  f"`mergebench convert --modelpool openclip-vit-{self.size}_TA8 --trust-pickle`.")
        tensors = read_pickle_checkpoint(path, trust_pickle=True, pickle_module=TASK_VECTORS_PICKLE)
        return StateDictSource(tensors, str(path))

    def convert(self, names: list[str]) -> Iterator[Path]:
        if not self.trust_pickle:
            raise CheckpointError("converting pickles unpickles them once; pass --trust-pickle to confirm you trust "
                                  f"the files under {self.root / self.arch}")
        for path in self.files(names):
            if path.with_suffix(".safetensors").is_file():
                continue
            yield convert_pickle_checkpoint(path, trust_pickle=True, pickle_module=TASK_VECTORS_PICKLE)


class VisualSource(RenamedSource):
    """The image-tower tensors of a checkpoint, named as the open_clip `VisionTransformer` names them."""

    def __init__(self, inner: TensorSource):
        names: dict[str, str] = {}
        for k in inner.keys():
            for prefix in VISUAL_PREFIXES:
                if k.startswith(prefix):
                    names[k[len(prefix):]] = k
                    break
        if not names:
            raise CheckpointError(f"{inner.name} holds no image-tower tensors (model.visual.* or visual.*)")
        super().__init__(inner, names, inner.name)


class OpenCLIPPool(CheckpointPool):
    """The pretrained OpenCLIP image encoder and the eight task-vectors experts, read from a local folder."""

    def __init__(self, size: str = "b32", *, root: str | os.PathLike[str] | None = None,
                 trust_pickle: bool | None = None):
        self.size = size
        self.name = f"openclip-vit-{size}_TA8"
        self.default_taskpool = f"openclip-zeroshot-vit-{size}_TA8"
        self.folder = OpenCLIPFolder(size, root, trust_pickle)
        self._tasks = suite("TA8")

    def configure(self, *, dtype: str | None = None, trust_pickle: bool = False) -> None:
        if trust_pickle:
            self.folder.trust_pickle = True

    @property
    def expert_names(self) -> list[str]:
        return list(self._tasks)

    def checkpoint_path(self, name: str) -> Path:
        """The release's pickle (its converted `.safetensors` beside it is read instead when there is one)."""
        return self.folder.pickle_path(name)

    def stored_tensors(self, name: str) -> TensorSource:
        return self.folder.tensors(name)

    def module_tensors(self, name: str, stored: TensorSource) -> TensorSource:
        return VisualSource(stored)

    def load_model(self, name: str) -> nn.Module:
        try:
            import open_clip
        except ImportError as exc:
            raise MergebenchError("evaluating OpenCLIP models needs open_clip: pip install 'mergebench-clip[openclip]'"
                                  ) from exc
        visual = open_clip.create_model(self.folder.arch, pretrained=None).visual
        visual.load_state_dict(self.state_dict(name))
        return visual.eval()

    def convert(self) -> Iterator[Path]:
        """Write a .safetensors beside every checkpoint and head of the pool (`mergebench convert`)."""
        names = [PRETRAINED, *self._tasks, *(f"head:{t}" for t in self._tasks)]
        return self.folder.convert(names)

    def identity(self, name: str) -> str:
        return f"{self.name}/{self.folder.pickle_path(name)}"

    def missing_resources(self) -> list[str]:
        try:
            paths = self.folder.files([PRETRAINED, *self._tasks])
        except MergebenchError as exc:
            return [str(exc)]
        return [f"checkpoint {p}" for p in paths if not (p.is_file() or p.with_suffix(".safetensors").is_file())]


class OpenCLIPTaskPool(CLIPZeroShotTaskPool):
    """The TA8 tasks scored with the task-vectors release's own heads: logits = head(normalize(visual(x)))."""

    def __init__(self, size: str = "b32", *, root: str | os.PathLike[str] | None = None,
                 trust_pickle: bool | None = None):
        super().__init__(size, "TA8")
        self.name = f"openclip-zeroshot-vit-{size}_TA8"
        self.folder = OpenCLIPFolder(size, root, trust_pickle)
        self._released: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def configure(self, *, dtype: str | None = None, trust_pickle: bool = False) -> None:
        if trust_pickle:
            self.folder.trust_pickle = True

    def released_head(self, task: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if task not in self._released:
            src = self.folder.tensors(f"head:{task}")
            keys = src.keys()
            weight = src.get(next(k for k in keys if k.endswith("weight")))
            bias_key = next((k for k in keys if k.endswith("bias")), None)
            self._released[task] = (weight.float(), src.get(bias_key).float() if bias_key else None)
        return self._released[task]

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        pixels = self.normalize(inputs)
        if pixels.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                features = model(pixels)
        else:
            features = model(pixels)
        weight, bias = self.released_head(task)
        weight = self._cached(f"released/{task}", weight, pixels.device)
        b = self._cached(f"released-bias/{task}", bias, pixels.device) if bias is not None else None
        return F.linear(F.normalize(features.float(), dim=-1), weight, b)

    def missing_resources(self) -> list[str]:
        missing = super().missing_resources()
        try:
            heads = self.folder.files([f"head:{t}" for t in self.tasks])
        except MergebenchError as exc:
            return [*missing, str(exc)]
        return [*missing, *(f"head {p}" for p in heads if not (p.is_file() or p.with_suffix(".safetensors").is_file()))]
