"""Where mergebench keeps caches (built pools, data statistics) and results by default."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MERGEBENCH_CACHE"
STORE_ENV = "MERGEBENCH_STORE"


def cache_dir() -> Path:
    """`$MERGEBENCH_CACHE`, else `~/.cache/mergebench`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mergebench")


def default_store() -> Path:
    """`$MERGEBENCH_STORE`, else `mergebench-results.sqlite` in the working directory."""
    return Path(os.environ.get(STORE_ENV) or "mergebench-results.sqlite")
