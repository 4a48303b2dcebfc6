"""Hugging Face model folders, for the hub pools: their tensors without building the model, and loading them quietly
in a chosen dtype.

The CLIP and text pools (and the text task pools, which read the experts' heads) each carried these helpers; they
live here once. Nothing here imports transformers at import time: only `quiet_transformers` and `dtype_kwargs`
do, when called, so the core does not depend on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mergebench_core.engine.pickle_checkpoints import read_pickle_checkpoint
from mergebench_core.engine.safetensors_reader import SafetensorsSource
from mergebench_core.engine.sources import StateDictSource, TensorSource
from mergebench_core.errors import CheckpointError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype from its name as users type it (`--dtype bf16`); None and torch dtypes pass through."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[value]


def dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    """The `from_pretrained` keyword for a dtype: transformers 5 renamed `torch_dtype` to `dtype`."""
    if dtype is None:
        return {}
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading reports and progress bars, restoring them afterwards: loading a body or a
    vision tower from a checkpoint that holds more reports every other key as unused, and that is the point."""
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


def folder_source(folder: str | Path, name: str) -> TensorSource:
    """Every tensor of a model (or peft adapter) folder, as stored: safetensors lazily, else its `pytorch_model.bin`
    through torch's weights-only loader (tensors and plain containers, never arbitrary objects), which older
    repositories such as the textattack experts only have."""
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
