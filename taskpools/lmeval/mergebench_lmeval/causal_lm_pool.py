"""A model pool of causal language models saved with `save_pretrained`: a pretrained folder and one per expert.

The smallest thing that lets a merging method meet lm-eval: every model is an `AutoModelForCausalLM` read from its
folder (float32 unless told otherwise), so merges copy the pretrained model with its config, and the lm-eval task
pool finds the tokenizer saved beside it. Experts are named after the lm-eval task they were fine-tuned for.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mergebench_core.contract.api import PRETRAINED, ModelPool
from mergebench_core.errors import MergebenchError
from mergebench_core.pools.hf_models import dtype_kwargs, parse_dtype


class CausalLMFolderPool(ModelPool):
    """`pretrained` and `experts` ({lm-eval task: folder}) are folders written by `save_pretrained`. An expert folder
    may instead hold a peft LoRA adapter of the pretrained model (`adapter_config.json`): the expert is then the base
    with the adapter merged in (B·A·α/r added to each adapted weight), so its task vector is the LoRA delta and every
    merging method, TIES and DARE included, works on the materialised deltas."""

    default_taskpool = None  # name the tasks: --taskpool "lmeval(tasks=...)"

    def __init__(self, pretrained: str | Path, experts: Mapping[str, str | Path], name: str = "causal-lm-folder",
                 dtype: str | None = None):
        self.name = name
        self.folders = {PRETRAINED: Path(pretrained), **{t: Path(f) for t, f in experts.items()}}
        self.adapters = {n for n, f in self.folders.items() if n != PRETRAINED and
                         not (f / "config.json").is_file() and (f / "adapter_config.json").is_file()}
        missing = [f"{n}: {f}" for n, f in self.folders.items()
                   if n not in self.adapters and not (f / "config.json").is_file()]
        if missing:
            raise MergebenchError(f"model pool {name!r}: these folders hold no config.json (write them with "
                                  f"model.save_pretrained) nor a peft adapter_config.json: {'; '.join(missing)}")
        self.dtype = parse_dtype(dtype) or torch.float32

    @property
    def expert_names(self) -> list[str]:
        return [n for n in self.folders if n != PRETRAINED]

    def configure(self, *, dtype: str | None = None, trust_pickle: bool = False) -> None:
        if dtype:
            self.dtype = parse_dtype(dtype) or self.dtype

    def load_model(self, name: str) -> nn.Module:
        from transformers import AutoModelForCausalLM

        if name not in self.folders:
            raise KeyError(f"model pool {self.name!r} has no model {name!r}; it has {', '.join(self.folders)}")
        if name in self.adapters:
            return self.with_adapter(self.folders[name])
        return AutoModelForCausalLM.from_pretrained(str(self.folders[name]), **dtype_kwargs(self.dtype)).eval()

    def adapter_folder(self, name: str) -> Path | None:
        """The peft LoRA adapter folder of expert `name`, None when the expert is a whole model
        (`lora_method.LoraAdapterPool`)."""
        return self.folders[name] if name in self.adapters else None

    def with_adapter(self, folder: str | Path) -> nn.Module:
        """The pretrained model with the LoRA adapter in `folder` merged into its weights."""
        from peft import PeftModel

        return PeftModel.from_pretrained(self.load_model(PRETRAINED), str(folder)).merge_and_unload().eval()

    def identity(self, name: str) -> str:
        """The folder and its weight files' sizes and times: a model saved again is a new identity."""
        folder = self.folders[name]
        stamp = hashlib.sha256()
        for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            st = os.stat(f)
            stamp.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return f"{self.name}/{name}@{folder.resolve()}#{stamp.hexdigest()[:12]}"

    def version_info(self) -> dict[str, str]:
        return {"models": ";".join(f"{n}={self.identity(n).rsplit('#', 1)[-1]}" for n in self.folders)}
