"""Pickle checkpoints (.pt/.bin/.ckpt): read only through torch's weights-only loader unless the user trusts the
file, and converted once to safetensors so that later runs never unpickle."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from mergebench_core.engine.safetensors_writer import save_state_dict
from mergebench_core.errors import CheckpointError

TRUST_PICKLE_ENV = "MERGEBENCH_TRUST_PICKLE"


def read_pickle_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False,
                           pickle_module: object | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a pickle checkpoint (.pt/.bin/.ckpt): a state dict, a dict holding one, or a whole module.

    By default only torch's weights-only loader runs, which builds tensors and plain containers and nothing else.
    Anything more (a pickled nn.Module, custom classes) needs full unpickling, which can run arbitrary code: it
    happens only with `trust_pickle=True` (`--trust-pickle`), and `mergebench convert` does it once so later runs
    read safetensors. `pickle_module` lets a pool map the classes its checkpoints name (see torch.load).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if trust_pickle:
        extra = {"pickle_module": pickle_module} if pickle_module is not None else {}
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, **extra)
        except ModuleNotFoundError as exc:
            raise CheckpointError(f"unpickling {path} needs the module {exc.name!r}, which is not installed") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path} is a pickle that holds more than tensors ({first[:200]}). mergebench does not unpickle "
                f"files by default, because unpickling can run arbitrary code. If you trust the file, pass "
                f"--trust-pickle (or set {TRUST_PICKLE_ENV}=1), or convert it once with "
                f"`mergebench convert --trust-pickle {path}`.") from None
    return _tensors_of(obj, str(path))


def _tensors_of(obj: object, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return {k: v.detach() for k, v in obj.state_dict().items()}
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], (Mapping, torch.nn.Module)) and len(obj) <= 4:
                return _tensors_of(obj[key], where)
        out: dict[str, torch.Tensor] = {}
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                out[str(k)] = v
            elif isinstance(v, (Mapping, torch.nn.Module)):
                out.update({f"{k}.{kk}": vv for kk, vv in _tensors_of(v, where).items()})
        if out:
            return out
    raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict or a module")


def convert_pickle_checkpoint(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                              trust_pickle: bool = False, pickle_module: object | None = None) -> Path:
    """Write the tensors of a pickle checkpoint as safetensors (default: beside it, same stem)."""
    path = Path(path)
    target = Path(out) if out is not None else path.with_suffix(".safetensors")
    tensors = read_pickle_checkpoint(path, trust_pickle=trust_pickle, pickle_module=pickle_module)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return save_state_dict(contiguous, target, {"format": "pt", "converted_from": path.name})
