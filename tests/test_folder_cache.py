"""Cached folders (`mergebench_core.pools.folder_cache`): built once per key, found again without rebuilding,
rebuilt when a file is edited or missing, and nothing left behind when a build fails."""

from __future__ import annotations

import pytest

from mergebench_core.pools.folder_cache import MANIFEST, cached_folder, folder_problem


def test_a_folder_is_built_once_per_key_and_rebuilt_when_damaged(tmp_path):
    builds = []

    def build(folder):
        builds.append(folder)
        (folder / "weights.bin").write_bytes(b"w" * 10)
        (folder / "sub").mkdir()
        (folder / "sub" / "config.json").write_text("{}")

    key = {"what": "thing", "n": 1}
    first = cached_folder(tmp_path, "things", key, build, "a thing")
    assert (first / "weights.bin").read_bytes() == b"w" * 10 and (first / MANIFEST).is_file()
    assert cached_folder(tmp_path, "things", key, build, "a thing") == first and len(builds) == 1
    assert cached_folder(tmp_path, "things", {"what": "thing", "n": 2}, build, "a thing") != first

    (first / "weights.bin").write_bytes(b"w" * 9 + b"x")
    assert "weights.bin is not the file" in folder_problem(first, key)
    assert cached_folder(tmp_path, "things", key, build, "a thing") == first and len(builds) == 3
    assert (first / "weights.bin").read_bytes() == b"w" * 10

    (first / "sub" / "config.json").unlink()
    assert folder_problem(first, key) == "sub/config.json is missing"
    assert folder_problem(first, {"what": "other"}) == "built for another key"


def test_a_failed_build_leaves_no_entry_and_no_partial_folder(tmp_path):
    def build(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cached_folder(tmp_path, "things", {"k": 1}, build, "a thing")
    assert [p.name for p in (tmp_path / "things").iterdir() if not p.name.endswith(".lock")] == []
