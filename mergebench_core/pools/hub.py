"""Where Hugging Face models and datasets live on this machine, and fetching them: one module for every pool family.

The CLIP and text pools (and their task pools) all read models from the hub cache and datasets from the hub or from
local `save_to_disk` copies; each family used to carry its own copy of this logic, and the copies drifted. The core
holds it so that a fix reaches every family at once. The core does not depend on `huggingface_hub` or `datasets`:
they are imported only by the functions that fetch or open something, which only the hub pools call.

The environment is read at call time, not at import time (huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE once,
when first imported), so a test or a user that sets it later is honoured. Models already in the hub cache are
opened from their snapshot folder directly: no network request is made for them at all, which makes runs fast and
reproducible (`mergebench download` refreshes them).

Datasets may come from local copies: `$<local_env>/<dataset id>[/<config>]/<split>` holding a
`datasets.Dataset.save_to_disk` folder is used instead of the hub dataset (air-gapped machines, the tests). Each
family names its own variable (`MERGEBENCH_CLIP_DATA_DIR`, `MERGEBENCH_TEXT_DATA_DIR`) and passes it as
`local_env`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mergebench_core.errors import MergebenchError

log = logging.getLogger(__name__)

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")

Progress = Callable[[str], None]
"""Told one line per item as `download` fetches it."""


# -- can anything be fetched? ---------------------------------------------------------------------------------------

def offline() -> bool:
    """Nothing can be fetched now: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) is set to a true
    value, or the hub's host does not answer. Either way what is missing is reported before any work starts."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in OFFLINE_ENV):
        return True
    return not hub_reachable()


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub (HF_ENDPOINT, else huggingface.co) opens; asked once per process per host,
    so a machine without internet is told at once rather than after huggingface_hub's retries (half a minute per
    file)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    key = f"{host}:{port}"
    if key not in _REACHABLE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[key] = True
        except OSError as exc:
            log.info("the Hugging Face hub (%s) is not reachable: %s", key, exc)
            _REACHABLE[key] = False
    return _REACHABLE[key]


def require_online(items: Sequence[str], *, local_env: str | None = None) -> None:
    """Refuse to start fetching when nothing can be fetched: one error naming every item still missing (and, with
    `local_env`, the variable that points at local dataset copies). Nothing happens when `items` is empty."""
    if items and offline():
        listing = "".join(f"\n  - {i}" for i in items)
        local = f", or point {local_env} at `save_to_disk` copies of the datasets" if local_env else ""
        raise MergebenchError(f"cannot fetch {len(items)} item(s): the Hugging Face hub is not reachable from this "
                              f"machine (or HF_HUB_OFFLINE is set):{listing}\nRun `mergebench download` where there "
                              f"is internet and copy the Hugging Face cache ({hub_cache()}) here{local}")


# -- the hub cache --------------------------------------------------------------------------------------------------

def hub_cache() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's own rule)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, repo_type: str = "model", revision: str = "main") -> Path | None:
    """The snapshot folder of `repo_id` in the hub cache: the one `refs/<revision>` points at, else a snapshot named
    `revision`, else the newest snapshot (datasets downloads by commit and may write no ref), else None."""
    folder = hub_cache() / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / revision
    if ref.is_file():
        snap = folder / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    if (folder / "snapshots" / revision).is_dir():
        return folder / "snapshots" / revision
    snaps = sorted((p for p in (folder / "snapshots").glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return snaps[-1] if snaps else None


# -- models ---------------------------------------------------------------------------------------------------------

def model_snapshot(repo_id: str, adapter: bool = False) -> Path | None:
    """A cached snapshot that holds a config and weights (for a peft adapter: its adapter config and weights), or
    None: a snapshot with only a model card or a tokenizer does not count as the model."""
    snap = cached_snapshot(repo_id)
    if snap is None:
        return None
    config, weights = ("adapter_config.json", ADAPTER_FILES) if adapter else ("config.json", WEIGHT_FILES)
    if not (snap / config).is_file():
        return None
    return snap if any((snap / f).is_file() for f in weights) else None


def model_location(repo_id: str, adapter: bool = False) -> str:
    """What to hand to `from_pretrained`: the cached snapshot folder when there is one, else the hub id (online
    only; offline, an error saying how to get the model here)."""
    snap = model_snapshot(repo_id, adapter)
    if snap is not None:
        return str(snap)
    if offline():
        raise MergebenchError(f"model {repo_id} is not in the Hugging Face cache ({hub_cache()}) and the hub cannot "
                              f"be reached (offline, or HF_HUB_OFFLINE is set); run `mergebench download` for its "
                              f"pool on a machine with internet first")
    return repo_id


def model_revision(repo_id: str) -> str:
    """The cached commit of a repository (part of cache keys and result identities), or "unresolved"."""
    snap = cached_snapshot(repo_id)
    return snap.name if snap is not None else "unresolved"


def model_card(repo_id: str) -> str | None:
    """The README.md of a cached model repository, when it was downloaded."""
    snap = cached_snapshot(repo_id)
    if snap is None or not (snap / "README.md").is_file():
        return None
    return (snap / "README.md").read_text(encoding="utf-8", errors="replace")


def download_model(repo_id: str, progress: Progress | None = None) -> Path:
    """Fetch a repository's configs, tokenizer and processor files, model card and weights (safetensors when it has
    them, else its pickles, which are only ever read with torch's weights-only loader)."""
    from huggingface_hub import HfApi, snapshot_download

    if progress:
        progress(f"model {repo_id}")
    files = HfApi().list_repo_files(repo_id)
    if any(f.endswith(".safetensors") for f in files):
        weights = ["*.safetensors", "*.safetensors.index.json"]
    else:
        weights = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin", "adapter_model.bin"]
    path = snapshot_download(repo_id, cache_dir=str(hub_cache()),
                             allow_patterns=["*.json", "*.txt", "*.model", "README.md", *weights])
    return Path(path)


# -- datasets -------------------------------------------------------------------------------------------------------

def describe_dataset(dataset: str, config: str | None, split: str) -> str:
    """How a dataset split is named in lists of missing resources: `dataset org/name (config) [split]`."""
    return f"dataset {dataset}{' (' + config + ')' if config else ''} [{split}]"


def local_dataset_dir(dataset: str, config: str | None, split: str, *, local_env: str) -> Path | None:
    """The `save_to_disk` copy of a dataset split under `$local_env`, when there is one."""
    root = os.environ.get(local_env)
    if not root:
        return None
    folder = Path(root).expanduser() / dataset
    if config:
        folder = folder / config
    folder = folder / split
    return folder if (folder / "state.json").is_file() else None


def dataset_available(dataset: str, config: str | None, split: str, *, local_env: str) -> bool:
    """A local copy exists, or the hub cache holds the dataset repository (with the config's files, when the
    repository keeps one folder per config as GLUE does)."""
    if local_dataset_dir(dataset, config, split, local_env=local_env) is not None:
        return True
    snap = cached_snapshot(dataset, "dataset")
    if snap is None:
        return False
    if config is None or (snap / config).is_dir():
        return True
    return not any(p.is_dir() and any(p.glob("*.parquet")) for p in snap.iterdir())  # not one folder per config


def dataset_revision(dataset: str, config: str | None, split: str, *, local_env: str) -> str:
    """Cheap identity of a dataset split's content, for cache keys: the local copy's fingerprint, else the hub
    commit, else "unresolved"."""
    local = local_dataset_dir(dataset, config, split, local_env=local_env)
    if local is not None:
        state = json.loads((local / "state.json").read_text())
        return "local-" + str(state.get("_fingerprint") or hashlib.sha256(
            (local / "state.json").read_bytes()).hexdigest()[:16])
    snap = cached_snapshot(dataset, "dataset")
    return snap.name if snap is not None else "unresolved"


def open_dataset(dataset: str, config: str | None, split: str, *, local_env: str) -> Any:
    """The split as a `datasets.Dataset` (memory-mapped Arrow), from the local copy or through `load_dataset`."""
    import datasets

    local = local_dataset_dir(dataset, config, split, local_env=local_env)
    if local is not None:
        return datasets.load_from_disk(str(local))
    return datasets.load_dataset(dataset, config, split=split)


def download_dataset(dataset: str, config: str | None, split: str, progress: Progress | None = None, *,
                     local_env: str) -> None:
    """Download and prepare a dataset split in the Hugging Face caches (nothing to do for a local copy)."""
    if local_dataset_dir(dataset, config, split, local_env=local_env) is not None:
        return
    if progress:
        progress(f"dataset {dataset}{'/' + config if config else ''} [{split}]")
    open_dataset(dataset, config, split, local_env=local_env)
