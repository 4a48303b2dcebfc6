"""What `mergebench merge` needs beyond the engine: whether a method can merge checkpoint files at all, and one
name per input checkpoint."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from mergebench_core.contract.api import Method, ModelPool, file_refusal
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
