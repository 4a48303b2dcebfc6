"""Where the text pools' models and datasets live on this machine, resolved when they are needed.

Models are looked up in the Hugging Face hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)
and opened from their snapshot folder, so a cached model costs no network request. Datasets come from a local
`save_to_disk` copy when `$MERGEBENCH_TEXT_DATA_DIR/<dataset id>[/<config>]/<split>` holds one (air-gapped machines,
the tests), else through `datasets.load_dataset`. The environment is read at call time, not at import time, so a
test or a user that sets it later is honoured.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

DATA_DIR_ENV = "MERGEBENCH_TEXT_DATA_DIR"
_TRUE = {"1", "true", "yes", "on"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")

Progress = Callable[[str], None]


def offline() -> bool:
    """Nothing can be fetched now: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) is set to a true
    value, or the hub's host does not answer. Either way what is missing is reported before any work starts."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    return not hub_reachable()


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub (HF_ENDPOINT, else huggingface.co) opens; asked once per process, so a
    machine without internet is told at once rather than after huggingface_hub's retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    key = f"{host}:{port}"
    if key not in _REACHABLE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[key] = True
        except OSError:
            _REACHABLE[key] = False
    return _REACHABLE[key]


def require_online(items: list[str]) -> None:
    """Refuse to start fetching when nothing can be fetched: one error naming every item still missing."""
    if items and offline():
        from mergebench_core import MergebenchError

        listing = "".join(f"\n  - {i}" for i in items)
        raise MergebenchError(f"cannot fetch {len(items)} item(s): the Hugging Face hub is not reachable from this "
                              f"machine (or HF_HUB_OFFLINE is set):{listing}\nRun `mergebench download` where there "
                              f"is internet and copy the Hugging Face cache ({hub_cache()}) here, or point "
                              f"{DATA_DIR_ENV} at `save_to_disk` copies of the datasets")


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The snapshot folder `refs/main` points at, else the newest snapshot, else None."""
    folder = hub_cache() / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / "main"
    if ref.is_file():
        snap = folder / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = sorted((p for p in (folder / "snapshots").glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return snaps[-1] if snaps else None


def model_snapshot(repo_id: str, adapter: bool = False) -> Path | None:
    """A cached snapshot holding a config and weights (for a peft adapter: its adapter config and weights)."""
    snap = cached_snapshot(repo_id)
    if snap is None:
        return None
    config, weights = ("adapter_config.json", ADAPTER_FILES) if adapter else ("config.json", WEIGHT_FILES)
    if not (snap / config).is_file():
        return None
    return snap if any((snap / f).is_file() for f in weights) else None


def model_location(repo_id: str, adapter: bool = False) -> str:
    """The cached snapshot folder to hand to `from_pretrained`, else the hub id (online only)."""
    snap = model_snapshot(repo_id, adapter)
    if snap is not None:
        return str(snap)
    if offline():
        from mergebench_core import MergebenchError

        raise MergebenchError(f"model {repo_id} is not in the Hugging Face cache ({hub_cache()}) and the hub cannot "
                              f"be reached (offline, or HF_HUB_OFFLINE is set); run `mergebench download` for its "
                              f"pool on a machine with internet first")
    return repo_id


def model_revision(repo_id: str) -> str:
    snap = cached_snapshot(repo_id)
    return snap.name if snap is not None else "unresolved"


def model_card(repo_id: str) -> str | None:
    """The README.md of a cached model repository, when it was downloaded."""
    snap = cached_snapshot(repo_id)
    if snap is None or not (snap / "README.md").is_file():
        return None
    return (snap / "README.md").read_text(encoding="utf-8", errors="replace")


def download_model(repo_id: str, progress: Progress | None = None) -> Path:
    """Fetch a repository's configs, tokenizer files, model card and weights (safetensors when it has them)."""
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


# -- datasets -------------------------------------------------------------------------------------------------
def local_dataset_dir(dataset: str, config: str | None, split: str) -> Path | None:
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
        return None
    folder = Path(root).expanduser() / dataset
    if config:
        folder = folder / config
    folder = folder / split
    return folder if (folder / "state.json").is_file() else None


def dataset_available(dataset: str, config: str | None, split: str) -> bool:
    """A local copy exists, or the hub cache holds the dataset repository (with the config's files, when the
    repository keeps one folder per config as GLUE does)."""
    if local_dataset_dir(dataset, config, split) is not None:
        return True
    snap = cached_snapshot(dataset, "dataset")
    if snap is None:
        return False
    if config is None or (snap / config).is_dir():
        return True
    return not any(p.is_dir() and any(p.glob("*.parquet")) for p in snap.iterdir())  # not one folder per config


def dataset_revision(dataset: str, config: str | None, split: str) -> str:
    """Cheap identity of a dataset split's content for cache keys: the local copy's fingerprint or the hub commit."""
    local = local_dataset_dir(dataset, config, split)
    if local is not None:
        state = json.loads((local / "state.json").read_text())
        return "local-" + str(state.get("_fingerprint") or hashlib.sha256(
            (local / "state.json").read_bytes()).hexdigest()[:16])
    snap = cached_snapshot(dataset, "dataset")
    return snap.name if snap is not None else "unresolved"


def open_dataset(dataset: str, config: str | None, split: str):  # -> datasets.Dataset
    import datasets

    local = local_dataset_dir(dataset, config, split)
    if local is not None:
        return datasets.load_from_disk(str(local))
    return datasets.load_dataset(dataset, config, split=split)


def download_dataset(dataset: str, config: str | None, split: str, progress: Progress | None = None) -> None:
    if local_dataset_dir(dataset, config, split) is not None:
        return
    if progress:
        progress(f"dataset {dataset}{'/' + config if config else ''} [{split}]")
    open_dataset(dataset, config, split)


def describe_dataset(dataset: str, config: str | None, split: str) -> str:
    return f"dataset {dataset}{' (' + config + ')' if config else ''} [{split}]"
