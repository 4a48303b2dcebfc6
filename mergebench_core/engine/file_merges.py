"""What `mergebench merge` needs beyond the engine: whether a method can merge checkpoint files at all, one name
per input checkpoint, and the check that keeps NaN and inf out of the files it writes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mergebench_core.contract.api import Method, ModelPool, file_refusal
from mergebench_core.engine.safetensors_writer import StreamingSafetensorsWriter
from mergebench_core.errors import MergebenchError


class CheckpointFiles(ModelPool):
    """The checkpoint files given to `mergebench merge`, as the pool a method's `refusal` is asked about: tensors
    only (`files_only`), with a pretrained model when `--base` names one. The engine reads the files itself; this
    pool never loads a module."""

    files_only = True
    how_to_add_pretrained = "give the pretrained checkpoint the experts were fine-tuned from with --base"

    def __init__(self, names: Sequence[str], has_base: bool):
        self.name = "the checkpoint files"
        self.has_pretrained = has_base
        self._names = list(names)

    @property
    def expert_names(self) -> list[str]:
        return list(self._names)

    def load_model(self, name: str) -> nn.Module:
        raise MergebenchError("checkpoint files hold tensors, not modules: `mergebench merge` streams them through "
                              "the tensor engine (`merge_sources`)")


def file_merge_refusal(method_cls: type[Method]) -> str | None:
    """Why `mergebench merge` can never run `method_cls` on checkpoint files, or None when it can. Kept for callers of
    the older API; `mergebench merge` asks `method_cls.refusal(CheckpointFiles(...), params)`."""
    return file_refusal(method_cls, CheckpointFiles([], has_base=True))


_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def checkpoint_task_names(paths: Sequence[str | Path], given: Sequence[str] | None = None) -> list[str]:
    """One name per expert checkpoint for `mergebench merge`: `given` (`--task-names`), or each input's name (a
    file's stem, a folder's name, a Hugging Face cache snapshot's repository name). They name per-task outputs
    (`<task>.safetensors`) and are what `slerp.models` refers to, so they must be distinct file names."""
    if given:
        names = list(given)
        if len(names) != len(paths):
            raise MergebenchError(f"--task-names gives {len(names)} names for {len(paths)} models; give one per model")
    else:
        names = []
        for p in map(Path, paths):
            if p.name.endswith(".index.json") or (p.is_file() and p.parent.name != "" and p.stem == "model"):
                p = p.parent
            if p.parent.name == "snapshots":  # models--org--name/snapshots/<revision>
                p = p.parent.parent
            name = p.name.removesuffix(".safetensors")
            names.append(name.split("--")[-1] if name.startswith("models--") else name)
    for n in names:
        if not _TASK_NAME.fullmatch(n):
            raise MergebenchError(f"task name {n!r} is not a plain file name (letters, digits, . _ + -); "
                                  f"choose names with --task-names")
    if len(set(names)) != len(names):
        raise MergebenchError(f"the models' names are not distinct ({', '.join(names)}); name them with "
                              f"--task-names a,b,...")
    return names


class NonFiniteOutputError(MergebenchError):
    """A merge produced NaN or inf: the output would load but compute garbage, so it is never written."""


class FiniteOnlySink:
    """Hands merged tensors to `sink` (a file writer) after checking each for NaN and inf, blocks and later
    corrections (`patch`) included.

    `mergebench run` refuses a merged model with a non-finite weight; a file merge must refuse it too, and it has to
    do so before the bytes reach the file, since the whole model never sits in memory to be checked afterwards.
    """

    def __init__(self, sink: StreamingSafetensorsWriter, method: str, where: str | Path):
        self.sink, self.method, self.where = sink, method, str(where)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._check(key, tensor)
        self.sink.write(key, tensor)

    def write_block(self, key: str, start: int, values: torch.Tensor) -> None:
        self._check(key, values)
        self.sink.write_block(key, start, values)

    def patch(self, key: str, index: torch.Tensor | None, values: torch.Tensor) -> None:
        self._check(key, values)
        self.sink.patch(key, index, values)

    def _check(self, key: str, values: torch.Tensor) -> None:
        if not values.is_floating_point() or values.numel() == 0:
            return
        lo, hi = torch.aminmax(values.detach())  # both finite exactly when every entry is (see check_finite)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return
        bad = int((~torch.isfinite(values)).sum())
        raise NonFiniteOutputError(
            f"method {self.method!r} produced {bad} non-finite values (NaN or inf) in tensor {key!r} of "
            f"{self.where}, so nothing was written. The inputs are finite (they are checked as they are read): "
            f"lower the parameters that scale the merge (e.g. method.scaling_factor), or merge checkpoints stored in "
            f"a wider dtype (float16 overflows above 65504)")
