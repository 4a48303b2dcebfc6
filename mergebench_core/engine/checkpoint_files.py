"""Which files make up a checkpoint (a file, a sharded index, a model folder), and the rule that keeps every file
read or copied inside the folder the user named (`input_root`): an index or a symlink cannot point mergebench at
files elsewhere on the machine."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mergebench_core.engine.safetensors_format import clipped_repr, max_header_bytes
from mergebench_core.errors import CheckpointError


def resolve_checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files that make up a checkpoint: a file, an index json, or a model folder.

    Files found through a folder or an index must lie inside that folder (`input_root`): an index naming an
    absolute path or one with `..`, or a symlink leading elsewhere, is refused, so a downloaded checkpoint cannot
    make mergebench read (and merge into its output) files it was not pointed at.
    """
    if path.is_dir():
        for index in ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json"):
            if (path / index).is_file():
                return _files_from_index(path / index)
        files = sorted(path.glob("*.safetensors"))
        if files:
            return [_inside(path, f, f"{path} holds {f.name}") for f in files]
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise CheckpointError(f"{path} holds only pickle checkpoints (.bin/.pt); convert them to safetensors "
                                  f"first (`mergebench convert`), mergebench never unpickles by default")
        raise CheckpointError(f"{path} contains no .safetensors file")
    if path.name.endswith(".index.json") and path.is_file():
        return _files_from_index(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise CheckpointError(f"{path} is a pickle checkpoint; convert it to safetensors first "
                              f"(`mergebench convert`), mergebench never unpickles by default")
    return [path]


def input_root(folder: Path) -> Path:
    """The folder that a checkpoint folder's files (shards, configs) may resolve into.

    That is the folder itself, except in a Hugging Face cache snapshot (`models--org--name/snapshots/<revision>/`),
    whose files are symlinks into the repository's `blobs/` folder: there it is the repository folder.
    """
    folder = Path(os.path.abspath(folder))
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        return folder.parent.parent.resolve()
    return folder.resolve()


def resolves_inside(folder: Path, f: Path) -> bool:
    """Whether `f` (a path in `folder`), after following every symlink, lies inside `input_root(folder)`."""
    try:
        f.resolve(strict=True).relative_to(input_root(folder))
    except (OSError, ValueError, RuntimeError):
        return False
    return True


def _inside(folder: Path, f: Path, what: str) -> Path:
    if not resolves_inside(folder, f):
        raise CheckpointError(f"{what}, which resolves to {os.path.realpath(f)}, outside the checkpoint folder; "
                              f"mergebench reads only files inside the folder it is given")
    return f


def _files_from_index(index: Path) -> list[Path]:
    try:
        size = index.stat().st_size
        if size > 4 * max_header_bytes():
            raise ValueError(f"{size} bytes, more than the {4 * max_header_bytes()} an index may have")
        data = json.loads(index.read_bytes().decode("utf-8"))
        weight_map = data["weight_map"] if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("its weight_map is not an object of tensor name -> shard file name")
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
    files = []
    for name in sorted(set(weight_map.values())):
        parts = name.replace("\\", "/").split("/")
        if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise CheckpointError(f"{index} names shard {clipped_repr(name)}, a path outside the checkpoint folder; "
                                  f"shards must be files inside it")
        f = index.parent / name
        if not f.is_file():
            raise CheckpointError(f"{index} names shard {clipped_repr(name)}, which is missing")
        files.append(_inside(index.parent, f, f"{index} names shard {clipped_repr(name)}"))
    return files


def copy_side_files(folder: Path, out: Path) -> list[str]:
    """Copy a checkpoint folder's other files (config, tokenizer) into `out`; returns a line per file skipped.

    Only regular files at the folder's top level are copied, never weights, and never through a symlink that leads
    outside the folder (`resolves_inside`): a `config.json` linked to a private file stays where it is. What is
    copied is the file's content, not the link.
    """
    skipped = []
    for f in sorted(folder.iterdir()):
        if f.name.endswith((".safetensors", ".bin", ".index.json", ".pt", ".pth", ".ckpt")) or f.name.startswith("."):
            continue
        if not resolves_inside(folder, f):
            skipped.append(f"{f} (a link to {os.path.realpath(f)}, outside {folder})")
            continue
        if not f.resolve().is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        target = out / f.name
        if target.is_symlink():
            target.unlink()
        shutil.copyfile(f.resolve(), target)
    return skipped

