"""Where the stability analysis keeps computed features between runs.

A seam, not a design: the core is to get one content-addressed cache (key stored and verified, a digest of the
data, a lock, an atomic write) for statistics, trained models and features alike. Until then this small class keeps
the features, and everything else reaches it only through `get(key, compute)` (`run_experiment(...,
features_cache=...)` takes any object with that method), so replacing it is a change here and in `running`'s
default, nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


class FeatureCache:
    """JSON files under `root`, named by a hash of what determines their content."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, key: Mapping[str, Any], compute: Callable[[], Any]) -> Any:
        path = self.root / f"{_digest(key)}.json"
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
                if stored.get("key") == json.loads(json.dumps(key, sort_keys=True, default=str)):
                    return stored["value"]
            except (OSError, ValueError):
                pass
        value = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "value": value}, sort_keys=True, default=str))
        tmp.replace(path)
        return value
