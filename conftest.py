"""Fixtures shared by the core's tests and every plugin's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """A folder holding the embedded digits pool, built once per test session (about 20 s on 2 cores)."""
    from mergebench_digits import Recipe, ensure_built

    root = tmp_path_factory.mktemp("digits-pool")
    ensure_built(Recipe(), root)
    return root


@pytest.fixture(scope="session")
def digits_pools(digits_root):
    """(model pool, task pool) of the embedded default pool, sharing the session's build."""
    from mergebench_digits import DigitsModelPool, DigitsTaskPool, Recipe

    return DigitsModelPool(Recipe(), digits_root), DigitsTaskPool(Recipe(), digits_root)


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    """Point MERGEBENCH_CACHE and MERGEBENCH_STORE at a fresh temporary folder."""
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEBENCH_STORE", str(tmp_path / "results.sqlite"))
    return tmp_path
