"""What `mergebench merge` needs beyond the engine: whether a method can merge checkpoint files at all, and one
name per input checkpoint."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from mergebench_core.contract.api import Method
from mergebench_core.engine.data_free import TensorMergeMethod
from mergebench_core.errors import MergebenchError


def file_merge_refusal(method_cls: type[Method]) -> str | None:
    """Why `mergebench merge` cannot run `method_cls` on checkpoint files, or None when it can."""
    if issubclass(method_cls, TensorMergeMethod):
        return None
    info, name = method_cls.info, method_cls.name
    if info.kind == "ensemble":
        return (f"method {name!r} is an output ensemble: it keeps every expert and averages their predictions when "
                f"they are scored, so there is no merged checkpoint to write. Score it with "
                f"`mergebench run --method {name} --modelpool ...`")
    if info.data != "none":
        return (f"method {name!r} needs {info.data} data from a task pool, which checkpoint files do not carry; "
                f"use `mergebench run --method {name} --modelpool ...`")
    if info.kind == "training":
        return (f"method {name!r} trains models rather than merging them; use `mergebench run --method {name} "
                f"--modelpool ...`")
    return (f"method {name!r} works on a whole model pool, not tensor by tensor, so it cannot merge files; use "
            f"`mergebench run --method {name} --modelpool ...`")


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
