"""Where Hugging Face models and datasets live on this machine, read at call time (not at import time).

huggingface_hub and datasets read HF_HUB_CACHE / HF_HUB_OFFLINE once, when first imported; mergebench reads them
whenever it resolves a resource, so a test (or a user) that sets them later is still honoured. Models already in
the hub cache are opened from their snapshot folder directly: no network request is made for them at all, which
makes runs fast and reproducible (`mergebench download` refreshes them).

Datasets can also be given as local copies: `$MERGEBENCH_CLIP_DATA_DIR/<dataset id>[/<config>]/<split>` holding a
`datasets.Dataset.save_to_disk` folder is used in place of the hub dataset (air-gapped machines, the tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DATA_DIR_ENV = "MERGEBENCH_CLIP_DATA_DIR"
_TRUE = {"1", "true", "yes", "on"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

Progress = Callable[[str], None]


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) is set to a true value, or the hub cannot be
    reached: either way nothing can be fetched now, so what is missing is reported before any work."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    return not hub_reachable()


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's host per process (HF_ENDPOINT, else huggingface.co): a machine without
    internet answers at once instead of after huggingface_hub's retries (half a minute per file)."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    key = f"{host}:{port}"
    if key not in _REACHABLE:
        import socket

        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[key] = True
        except OSError as exc:
            log.info("the Hugging Face hub (%s) is not reachable: %s", key, exc)
            _REACHABLE[key] = False
    return _REACHABLE[key]


def require_hub(items: list[str]) -> None:
    """Refuse to start fetching when nothing can be fetched: one error naming every item that is still missing."""
    from mergebench_core import MergebenchError

    if items and offline():
        listing = "".join(f"\n  - {i}" for i in items)
        raise MergebenchError(f"cannot fetch {len(items)} item(s): the Hugging Face hub is not reachable from this "
                              f"machine (or HF_HUB_OFFLINE is set):{listing}\nRun `mergebench download` where there "
                              f"is internet and copy the Hugging Face cache ({hub_cache()}) here, or point "
                              f"{DATA_DIR_ENV} at `save_to_disk` copies of the datasets")


def hub_cache() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's own rule)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def _repo_folder(repo_id: str, repo_type: str) -> Path:
    return hub_cache() / f"{repo_type}s--{repo_id.replace('/', '--')}"


def cached_snapshot(repo_id: str, repo_type: str = "model", revision: str = "main") -> Path | None:
    """The snapshot folder of `repo_id` in the hub cache (the one `refs/<revision>` points at), or None."""
    folder = _repo_folder(repo_id, repo_type)
    ref = folder / "refs" / revision
    if ref.is_file():
        snap = folder / "snapshots" / ref.read_text().strip()
        return snap if snap.is_dir() else None
    if (folder / "snapshots" / revision).is_dir():
        return folder / "snapshots" / revision
    snaps = sorted((p for p in (folder / "snapshots").glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return snaps[-1] if snaps else None  # datasets downloads by commit and may write no ref


def model_snapshot(repo_id: str) -> Path | None:
    """A cached snapshot of a model repository that holds a config and weights, or None."""
    snap = cached_snapshot(repo_id, "model")
    if snap is None or not (snap / "config.json").is_file():
        return None
    return snap if any((snap / f).is_file() for f in WEIGHT_FILES) else None


def model_location(repo_id: str) -> str:
    """What to hand to `from_pretrained`: the cached snapshot folder when there is one, else the hub id."""
    snap = model_snapshot(repo_id)
    if snap is not None:
        return str(snap)
    if offline():
        from mergebench_core import MergebenchError

        raise MergebenchError(f"model {repo_id} is not in the Hugging Face cache ({hub_cache()}) and the hub cannot be "
                              f"reached (offline, or HF_HUB_OFFLINE is set); run `mergebench download` for its pool on "
                              f"a machine with internet first")
    return repo_id


def model_revision(repo_id: str) -> str:
    snap = model_snapshot(repo_id)
    return snap.name if snap is not None else "unresolved"


def download_model(repo_id: str, progress: Progress | None = None) -> Path:
    """Fetch a model's config, tokenizer/processor files and weights (safetensors when the repo has them)."""
    from huggingface_hub import HfApi, snapshot_download

    if progress:
        progress(f"model {repo_id}")
    files = HfApi().list_repo_files(repo_id)
    weights = ["*.safetensors", "*.safetensors.index.json"] if any(f.endswith(".safetensors") for f in files) \
        else ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
    path = snapshot_download(repo_id, cache_dir=str(hub_cache()),
                             allow_patterns=["*.json", "*.txt", *weights])
    return Path(path)


# -- datasets -------------------------------------------------------------------------------------------------
def local_dataset_dir(dataset: str, config: str | None, split: str) -> Path | None:
    """The `save_to_disk` copy of a dataset split under $MERGEBENCH_CLIP_DATA_DIR, when there is one."""
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
        return None
    folder = Path(root).expanduser() / dataset
    if config:
        folder = folder / config
    folder = folder / split
    return folder if (folder / "state.json").is_file() else None


def dataset_available(dataset: str, config: str | None, split: str) -> bool:
    """A local copy exists, or the hub cache holds a snapshot of the dataset repository."""
    return local_dataset_dir(dataset, config, split) is not None or \
        cached_snapshot(dataset, "dataset") is not None


def dataset_revision(dataset: str, config: str | None, split: str) -> str:
    """Cheap identity of a dataset's content, for cache keys: the hub commit, or the local copy's fingerprint."""
    local = local_dataset_dir(dataset, config, split)
    if local is not None:
        state = json.loads((local / "state.json").read_text())
        return "local-" + str(state.get("_fingerprint") or hashlib.sha256(
            (local / "state.json").read_bytes()).hexdigest()[:16])
    snap = cached_snapshot(dataset, "dataset")
    return snap.name if snap is not None else "unresolved"


def open_dataset(dataset: str, config: str | None, split: str):  # -> datasets.Dataset
    """The split as a `datasets.Dataset` (memory-mapped Arrow), from the local copy or through `load_dataset`."""
    import datasets

    local = local_dataset_dir(dataset, config, split)
    if local is not None:
        return datasets.load_from_disk(str(local))
    return datasets.load_dataset(dataset, config, split=split)


def download_dataset(dataset: str, config: str | None, split: str, progress: Progress | None = None) -> None:
    """Download and prepare a dataset split in the Hugging Face caches (a no-op for local copies)."""
    if local_dataset_dir(dataset, config, split) is not None:
        return
    if progress:
        progress(f"dataset {dataset}{'/' + config if config else ''} [{split}]")
    open_dataset(dataset, config, split)
