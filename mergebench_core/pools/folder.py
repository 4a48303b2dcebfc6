"""Pools whose models are checkpoints on disk: one place that finds a model's file, reads it lazily and loads it.

Every pool that keeps its models as safetensors (the embedded digits pools, the EfficientNet pool, a folder of your
own models, the Hugging Face and OpenCLIP pools) used to repeat the same three methods (`load_model`, `state_dict`,
`tensor_source`), each with its own idea of what a missing or unknown model is. Two bases hold them once:

- `CheckpointPool`: a model is a checkpoint (a file, or a folder of shards) at `checkpoint_path(name)`; its tensors
  are read lazily (`tensor_source`, which the merge engine streams from without building the model), optionally
  renamed to the module's names (`module_tensors`); `state_dict` is every tensor of that source. Pools whose
  checkpoints hold more than the merged module (a classifier head, a text tower) or that are not safetensors
  override `stored_tensors` / `module_tensors`.
- `SafetensorsFolderPool`: the common case, `<folder>/<name>.safetensors` per model, with `build_model()` (an
  untrained instance of the architecture) and `load_model` = that instance with the checkpoint loaded. A name the
  pool does not have is a KeyError listing its models; a file that is missing, or a file (or link) that leads
  outside its folder, is a `CheckpointError` naming the file and what to do. The folder is asked for only when a
  model is read, so pools that build their checkpoints on first use (the embedded pools) stay lazy.
- `CheckpointFolderPool`, on that base: a folder of your own independently trained models and the `model.py` that
  builds and aligns them (the `fusion-folder` pool, `folder_pool_from_env`).

`RenamedSource` shows stored tensors under the module's names, lazily.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mergebench_core.contract.api import PRETRAINED, ModelPool
from mergebench_core.engine.checkpoint_files import resolves_inside
from mergebench_core.engine.safetensors_format import read_safetensors_header
from mergebench_core.engine.safetensors_reader import SafetensorsSource
from mergebench_core.engine.sources import TensorSource
from mergebench_core.errors import CheckpointError, MergebenchError

if TYPE_CHECKING:
    from mergebench_core.fusion.alignment import PermutationSpec

SUFFIX = ".safetensors"


class CheckpointPool(ModelPool):
    """A pool whose models are checkpoints on disk, read one tensor at a time.

    Subclasses implement `checkpoint_path(name)`; they may override `stored_tensors` (another format, a fallback)
    and `module_tensors` (stored names that differ from the module's). `load_model` stays theirs, or comes from
    `SafetensorsFolderPool`.
    """

    @abstractmethod
    def checkpoint_path(self, name: str) -> Path:
        """Where model `name`'s checkpoint is: a `.safetensors` file, an index, or a folder holding them."""

    def source_name(self, name: str) -> str:
        """How errors and logs name model `name`'s tensors."""
        return f"{self.name}/{name}"

    def stored_tensors(self, name: str) -> TensorSource:
        """Every tensor of the checkpoint, as stored, read lazily (headers now, data when asked for)."""
        return SafetensorsSource(self.checkpoint_path(name), name=self.source_name(name))

    def module_tensors(self, name: str, stored: TensorSource) -> TensorSource:
        """The stored tensors under the names of the module that is merged (all of them, unrenamed, by default)."""
        return stored

    def tensor_source(self, name: str) -> TensorSource:
        """Model `name` as a lazy `TensorSource` under the module's names (`merging.TensorSourcePool`)."""
        return self.module_tensors(name, self.stored_tensors(name))

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        src = self.tensor_source(name)
        return {k: src.get(k) for k in src.keys()}


class SafetensorsFolderPool(CheckpointPool):
    """Models stored as `<folder>/<name>.safetensors`: the pretrained model (when the pool has one) and each expert.

    Subclasses provide `folder` (a property may build the checkpoints on first use), `build_model()` and
    `expert_names`; `folder_of(name)` when some models live elsewhere (a pretrained model shared by variants).
    """

    folder: Path

    @abstractmethod
    def build_model(self) -> nn.Module:
        """An untrained instance of the architecture (no checkpoint is read or built to make it)."""

    def model_names(self) -> list[str]:
        """Every model the pool can read: the pretrained model first when it has one, then the experts."""
        return ([PRETRAINED] if self.has_pretrained else []) + list(self.expert_names)

    def folder_of(self, name: str) -> Path:
        """The folder that holds model `name`'s checkpoint."""
        return self.folder

    def checkpoint_path(self, name: str) -> Path:
        if name not in self.model_names():
            why = " (it has no pretrained model)" if name == PRETRAINED and not self.has_pretrained else ""
            raise KeyError(f"pool {self.name!r} has no model {name!r}{why}; models: {', '.join(self.model_names())}")
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise CheckpointError(f"pool {self.name!r}: model name {name!r} would name a file outside the pool's "
                                  f"folder; model names must be plain file names")
        folder = self.folder_of(name)
        path = folder / f"{name}{SUFFIX}"
        if not path.is_file():
            raise CheckpointError(f"pool {self.name!r}: the checkpoint of model {name!r} is missing ({path}); "
                                  f"put the file back (pools that build their own checkpoints, as the embedded ones "
                                  f"do, build them again when their cache folder is removed)")
        if not resolves_inside(folder, path):
            raise CheckpointError(f"pool {self.name!r}: {path} leads outside {folder}; a pool reads only files "
                                  f"inside its folder, so copy the checkpoint there instead of linking it")
        return path

    def load_model(self, name: str) -> nn.Module:
        model = self.build_model()
        model.load_state_dict(self.state_dict(name))
        return model.eval()


class RenamedSource:
    """A `TensorSource` that shows the tensors of another under other names (`names`: shown name -> stored name).

    Checkpoints rarely name tensors as the merged module does: a body saved with its head carries a prefix
    (`roberta.`, `transformer.`), a full CLIP checkpoint names the vision tower `vision_model.*`, tied weights are
    stored once. Reading through the mapping keeps the source lazy."""

    def __init__(self, stored: TensorSource, names: Mapping[str, str], name: str | None = None):
        self.files, self._map = stored, dict(names)
        self.name = name if name is not None else getattr(stored, "name", "tensors")

    @classmethod
    def for_module(cls, stored: TensorSource, module_keys: Sequence[str], name: str, *,
                   prefixes: Sequence[str] = ("",), aliases: Mapping[str, str] | None = None,
                   strip: Sequence[str] = ()) -> RenamedSource:
        """The module's keys, each found in `stored` as the first present of: the key under each of `prefixes`,
        the key it aliases (tied weights, `aliases`) under each prefix, the key without each of `strip`. A key found
        nowhere is a `CheckpointError` naming it and every name tried."""
        present = set(stored.keys())
        aliases = aliases or {}
        names: dict[str, str] = {}
        for k in module_keys:
            candidates = [p + k for p in prefixes] + [p + aliases[k] for p in prefixes if k in aliases] \
                + [k.removeprefix(s) for s in strip]
            found = next((c for c in candidates if c in present), None)
            if found is None:
                raise CheckpointError(f"{name}: the checkpoint has no tensor for {k!r} (looked for "
                                      f"{', '.join(dict.fromkeys(candidates))})")
            names[k] = found
        return cls(stored, names, name)

    def keys(self) -> list[str]:
        return list(self._map)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files.shape(self._map[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.files.dtype(self._map[key])

    def get(self, key: str) -> torch.Tensor:
        return self.files.get(self._map[key])


# -- a folder of your own models (the `fusion-folder` pool) ---------------------------------------------------------

FOLDER_ENV = "MERGEBENCH_FUSION_DIR"


class CheckpointFolderPool(SafetensorsFolderPool):
    """Your own independently trained models, from a folder: one `<name>.safetensors` per model and a `model.py`
    that defines the architecture and how to align it:

        def build_model() -> torch.nn.Module: ...           # required: an untrained instance of the architecture
        def permutation_spec() -> PermutationSpec: ...      # optional: what fusion methods align (None: no fusion)
        TASKPOOL = "digits_full"                            # optional: the task pool that scores the models

    Every checkpoint must hold exactly the tensors of `build_model()` with the same shapes, and the spec must fit
    them; anything else is refused when the pool is opened, with the file and tensor named. Checkpoints are read as
    safetensors only (never unpickled: convert pickles once with `mergebench convert`); `model.py` is your own code
    and runs when the pool opens. Models load lazily, in file-name order.
    """

    relation = "independent"
    has_pretrained = False

    def __init__(self, folder: str | Path, *, name: str | None = None):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise MergebenchError(f"model folder {str(folder)!r} does not exist; point it at a folder holding "
                                  f"model.py and one .safetensors file per model")
        self.module = _load_model_file(folder / "model.py")
        files = sorted(folder.glob(f"*{SUFFIX}"))
        if len(files) < 2:
            pickles = sorted(p.name for ext in ("*.pt", "*.pth", "*.bin", "*.ckpt") for p in folder.glob(ext))
            hint = (f"; {', '.join(pickles)} are pickles, never read: convert each once with `mergebench convert "
                    f"--trust-pickle FILE`" if pickles else "")
            raise MergebenchError(f"model folder {str(folder)!r} holds {len(files)} .safetensors file(s); fusion "
                                  f"needs at least two models{hint}")
        self.spec = self.module.permutation_spec() if hasattr(self.module, "permutation_spec") else None
        self.name = name or f"folder:{folder.name}"
        self.default_taskpool: str | None = getattr(self.module, "TASKPOOL", None)
        self.folder, self.files = folder, {f.stem: f for f in files}
        self._validate()

    @property
    def expert_names(self) -> list[str]:
        return list(self.files)

    def build_model(self) -> nn.Module:
        return self.module.build_model()

    def task_of(self, expert: str) -> str:
        return expert

    def permutation_spec(self) -> PermutationSpec | None:
        return self.spec

    def identity(self, name: str) -> str:
        stat = self.files[name].stat()
        return f"folder:{self.folder.resolve()}/{name}@{stat.st_size}-{stat.st_mtime_ns}"

    def version_info(self) -> dict[str, str]:
        return {"folder": str(self.folder.resolve()),
                "models": ",".join(f"{n}@{p.stat().st_size}-{p.stat().st_mtime_ns}" for n, p in self.files.items())}

    def _validate(self) -> None:
        model = self.build_model()
        if not isinstance(model, nn.Module):
            raise MergebenchError(f"{self.folder / 'model.py'}: build_model() returned {type(model).__name__}, not a "
                                  f"torch.nn.Module")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for name in self.files:
            path = self.checkpoint_path(name)  # a link that leads out of the folder is refused here, before any work
            header = read_safetensors_header(path)
            shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
            missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
            wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
            if missing or extra or wrong:
                parts = ([f"lacks {missing[:4]}"] if missing else []) + ([f"has extra {extra[:4]}"] if extra else []) \
                    + [f"{k} is {shapes[k]}, build_model() makes {expected[k]}" for k in wrong[:3]]
                raise MergebenchError(f"checkpoint {path.name} does not fit model.py's build_model(): "
                                      f"{'; '.join(parts)}; every model of a fusion pool must have one architecture")
        if self.spec is not None:
            # checked by what a spec must do rather than by its class: importing the fusion package from here
            # would make `mergebench_core.fusion` (which re-exports this pool) import itself
            if not callable(getattr(self.spec, "validate_model", None)):
                raise MergebenchError(f"{self.folder / 'model.py'}: permutation_spec() must return a "
                                      f"mergebench_core.contract.permutations.PermutationSpec, got "
                                      f"{type(self.spec).__name__}")
            self.spec.validate_model(model)


def _load_model_file(path: Path) -> Any:
    """Run a model folder's `model.py` as a module of its own (named after its path, so two folders never share one)
    and check that it defines `build_model()`."""
    import hashlib
    import importlib.util

    if not path.is_file():
        raise MergebenchError(f"{path} is missing: a model folder needs a model.py defining build_model() (and "
                              f"permutation_spec() for fusion)")
    name = "mergebench_user_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise MergebenchError(f"{path} failed to run: {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(module, "build_model", None)):
        raise MergebenchError(f"{path} defines no build_model(); it must return an untrained instance of the "
                              f"architecture (torch.nn.Module)")
    return module


def folder_pool_from_env() -> CheckpointFolderPool:
    """The `fusion-folder` pool: `CheckpointFolderPool($MERGEBENCH_FUSION_DIR)`."""
    folder = os.environ.get(FOLDER_ENV)
    if not folder:
        raise MergebenchError(f"pool 'fusion-folder' reads your models from the folder in ${FOLDER_ENV} (model.py and "
                              f"one .safetensors per model); set it, e.g. {FOLDER_ENV}=./my-models")
    pool = CheckpointFolderPool(folder)
    pool.name = "fusion-folder"
    return pool
