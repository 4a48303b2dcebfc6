"""Finding the models a MergeKit config names, and only where a config may point.

A config is often downloaded with a recipe, so it is treated like a checkpoint index (`engine.checkpoint_files`):
it may name model folders inside the folders the user allowed, never elsewhere on the machine. Allowed are the
folder holding the config, the working directory (MergeKit resolves relative paths there), the Hugging Face cache,
and every `--models-dir`. A path with a `..` component is refused outright, and a symlink counts where it leads.
A name that is no local folder is looked up as a Hugging Face repository id (`org/name`, optionally `@revision`) in
the local cache; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mergebench_core.mergekit.config import MergeKitConfigError


def allowed_roots(config_path: str | os.PathLike[str], models_dirs: Sequence[str | os.PathLike[str]] = ()
                  ) -> list[Path]:
    """The folders (resolved) that a config's model paths may lie in."""
    from mergebench_core.pools.hub import hub_cache

    roots = [Path(os.path.abspath(config_path)).parent, Path.cwd(), hub_cache(), *map(Path, models_dirs)]
    return list(dict.fromkeys(r.resolve() for r in roots))


def resolve_model(ref: str, where: str, roots: Sequence[Path]) -> Path:
    """The local folder or file of model `ref` (as written at `where` in the config)."""
    parts = ref.replace("\\", "/").split("/")
    if ".." in parts:
        raise MergeKitConfigError(f"{where}: model path {ref!r} contains '..'; name the folder without stepping out "
                                  f"of another one (an absolute path inside an allowed folder, or --models-dir)")
    local = Path(ref).expanduser()
    local = local if local.is_absolute() else Path.cwd() / local
    if local.exists():
        return _inside_roots(local, ref, where, roots)
    repo, _, revision = ref.partition("@")
    if len(repo.split("/")) == 2 and not ref.startswith(("/", ".", "~")):
        from mergebench_core.pools.hub import cached_snapshot, hub_cache

        snap = cached_snapshot(repo, revision=revision or "main")
        if snap is not None and (snap / "config.json").exists():
            return _inside_roots(snap, ref, where, roots)
        raise MergeKitConfigError(f"{where}: {ref!r} is neither a local folder nor a model in the Hugging Face cache "
                                  f"({hub_cache()}); download it first (huggingface-cli download {repo}) or name "
                                  f"a local folder")
    raise MergeKitConfigError(f"{where}: model {ref!r} does not exist ({local})")


def _inside_roots(path: Path, ref: str, where: str, roots: Sequence[Path]) -> Path:
    real = path.resolve()
    for root in roots:
        try:
            real.relative_to(root)
            return path
        except ValueError:
            continue
    raise MergeKitConfigError(f"{where}: model {ref!r} resolves to {real}, outside the folders a config may name "
                              f"({', '.join(map(str, roots))}); if you trust this config, allow the folder with "
                              f"--models-dir {real.parent}")

