"""The stability analysis's features in the core's content cache: exact values back, computed once, and a damaged
or foreign entry recomputed instead of used."""

from __future__ import annotations

import math
import struct
from pathlib import Path

from mergebench_mergeability.cache import FeatureCache

GRAM_KEY = {"what": "task_vector_gram", "pretrained": "digits/pretrained", "experts": ["a", "b"], "version": 1}
GRAM = [[1.0, 0.1 + 0.2], [0.1 + 0.2, 1 / 3]]  # values with no short decimal spelling


class Counted:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def _flip_data_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    raw[8 + header_len + 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_feature_is_computed_once_and_read_back_bit_for_bit(tmp_path):
    cache, compute = FeatureCache(tmp_path), Counted(GRAM)
    assert cache.feature(GRAM_KEY, compute) == GRAM
    again = FeatureCache(tmp_path).feature(GRAM_KEY, compute)
    assert again == GRAM and compute.calls == 1
    assert [p.name for p in tmp_path.glob("*.safetensors")] == [cache.entry_path(GRAM_KEY).name]
    assert cache.entry_path(GRAM_KEY).name.startswith("task_vector_gram-")
    distance = Counted(math.sqrt(2) / 3)
    key = {"what": "gradient_l2_distance", "members": ["a", "b"], "examples": 256}
    assert cache.feature(key, distance) == math.sqrt(2) / 3
    assert FeatureCache(tmp_path).feature(key, distance) == math.sqrt(2) / 3 and distance.calls == 1


def test_a_damaged_feature_entry_is_rebuilt_not_used(tmp_path, caplog):
    cache = FeatureCache(tmp_path)
    cache.feature(GRAM_KEY, lambda: GRAM)
    path = cache.entry_path(GRAM_KEY)
    _flip_data_byte(path)
    recompute = Counted([[2.0, 0.5], [0.5, 3.0]])  # a different answer shows which one came back
    assert FeatureCache(tmp_path).feature(GRAM_KEY, recompute) == [[2.0, 0.5], [0.5, 3.0]]
    assert recompute.calls == 1
    assert str(path) in caplog.text and "does not match its digest" in caplog.text
    assert FeatureCache(tmp_path).feature(GRAM_KEY, recompute) == [[2.0, 0.5], [0.5, 3.0]]
    assert recompute.calls == 1  # the rebuilt entry is trusted again


def test_an_entry_of_another_key_is_not_used(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.feature(GRAM_KEY, lambda: GRAM)
    other = {**GRAM_KEY, "version": 2}
    cache.entry_path(GRAM_KEY).rename(cache.entry_path(other))  # a hand-copied file under another key's name
    assert cache.feature(other, lambda: [[5.0]]) == [[5.0]]


def test_a_key_value_json_cannot_hold_is_keyed_by_its_str(tmp_path):
    cache = FeatureCache(tmp_path)
    compute = Counted(0.25)
    assert cache.feature({"what": "x", "taskpool": Path("/data/a")}, compute) == 0.25
    assert cache.feature({"what": "x", "taskpool": "/data/a"}, compute) == 0.25 and compute.calls == 1
