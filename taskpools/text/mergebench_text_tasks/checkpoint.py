"""Reading tensors out of Hugging Face model folders without building the model.

Folders with safetensors are read lazily, one tensor at a time (`mergebench_core.engine.tensors.SafetensorsSource`); older
repositories (the textattack experts) only have `pytorch_model.bin`, which is read with torch's weights-only loader
(tensors and plain containers, never arbitrary objects), the same policy as the rest of mergebench.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mergebench_core import CheckpointError
from mergebench_core.engine.tensors import SafetensorsSource, StateDictSource, TensorSource, read_pickle_checkpoint


def folder_source(folder: str | Path, name: str) -> TensorSource:
    """Every tensor of a model (or peft adapter) folder, as stored: safetensors lazily, else the weights-only
    pickle."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return SafetensorsSource(folder, name=name)
    if (folder / "adapter_model.safetensors").is_file():
        return SafetensorsSource(folder / "adapter_model.safetensors", name=name)
    for candidate in ("pytorch_model.bin", "adapter_model.bin"):
        if (folder / candidate).is_file():
            return StateDictSource(read_pickle_checkpoint(folder / candidate), name)
    raise CheckpointError(f"{name}: no safetensors or pytorch_model.bin weights in {folder}")


def read_tensors(folder: str | Path, keys: Sequence[str], name: str,
                 prefixes: Sequence[str] = ("",)) -> dict[str, torch.Tensor]:
    """The tensors `keys` of a model folder, each looked up under every prefix in turn (`score.weight` may be
    stored as `score.weight` or `model.score.weight`)."""
    src = folder_source(folder, name)
    present = set(src.keys())
    out = {}
    for key in keys:
        for p in prefixes:
            if p + key in present:
                out[key] = src.get(p + key)
                break
        else:
            raise CheckpointError(f"{name}: the checkpoint has no tensor {key!r} (looked for "
                                  f"{', '.join(p + key for p in prefixes)})")
    return out


class RenamedSource:
    """The tensors of a checkpoint under the names a module's `state_dict()` uses: each module key is found in the
    files as itself or under one of `prefixes` (a base model read from a checkpoint with a head). Keys listed in
    `aliases` (tied weights stored once) are read from the key they alias."""

    def __init__(self, files: TensorSource, module_keys: Sequence[str], name: str, prefixes: Sequence[str] = ("",),
                 aliases: dict[str, str] | None = None):
        self.files, self.name = files, name
        present = set(files.keys())
        self._map: dict[str, str] = {}
        aliases = aliases or {}
        for k in module_keys:
            for candidate in [p + k for p in prefixes] + [p + aliases[k] for p in prefixes if k in aliases]:
                if candidate in present:
                    self._map[k] = candidate
                    break
            else:
                raise CheckpointError(f"{name}: the checkpoint has no tensor for {k!r}")

    def keys(self) -> list[str]:
        return list(self._map)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files.shape(self._map[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.files.dtype(self._map[key])

    def get(self, key: str) -> torch.Tensor:
        return self.files.get(self._map[key])
