"""The stability analysis's features in the core's content-addressed cache (`mergebench_core.cache`).

A feature (a Gram matrix of task vectors, a gradient distance) is stored as one float64 tensor, which holds every
Python float bit for bit, so a cached feature equals the computed one exactly. Being a `ContentCache` client, an
entry is found by its key, which is stored in it and checked; its data is checked against its digest on every read;
it is built once across processes under its lock and written atomically. A damaged or hand-edited entry is logged
and recomputed, never used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mergebench_core.cache import ContentCache, Entry, Key
from mergebench_core.paths import cache_dir

Feature = Any
"""A float, or a (nested) list of floats."""


class FeatureCache(ContentCache):
    """Features under `<cache dir>/mergeability`, each entry named `<what>-<hash of the key>.safetensors`, where
    `what` is the key's own field naming the feature."""

    @classmethod
    def default(cls) -> FeatureCache:
        """The cache every run shares: `$MERGEBENCH_CACHE/mergeability`."""
        return cls(Path(cache_dir()) / "mergeability")

    def entry_name(self, key: Key, digest: str) -> str:
        return f"{key.get('what', 'feature')}-{digest}"

    def feature(self, key: Key, compute: Callable[[], Feature]) -> Feature:
        """The feature under `key`: from the cache, or `compute()`d once and stored. A value JSON cannot hold in the key
        (a version object) is keyed by its str, as the features' keys always were."""
        key = json.loads(json.dumps(key, sort_keys=True, default=str))
        what = f"mergeability feature {key.get('what', '')}".rstrip()
        entry = self.get_or_build(key, lambda: Entry({"value": torch.tensor(compute(), dtype=torch.float64)}), what)
        return entry.tensors["value"].tolist()
