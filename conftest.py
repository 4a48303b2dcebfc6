"""Fixtures shared by the core's tests and every plugin's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """A MERGEBENCH_CACHE folder for the session, holding the embedded pool built once (about 20 s on 2 cores).

    Subprocess tests of the CLI set MERGEBENCH_CACHE to it, so they reuse the build.
    """
    import os
    from pathlib import Path

    from mergebench_digits import Recipe, ensure_built

    # MERGEBENCH_TEST_CACHE keeps the build between test sessions on a developer's machine; CI starts fresh.
    kept = os.environ.get("MERGEBENCH_TEST_CACHE")
    cache = Path(kept) if kept else tmp_path_factory.mktemp("mergebench-cache")
    ensure_built(Recipe(), cache / "pools" / "digits")
    return cache


@pytest.fixture(scope="session")
def digits_root(session_cache):
    """The folder that `ensure_built` takes as root for the session's digits pool."""
    return session_cache / "pools" / "digits"


@pytest.fixture(scope="session")
def digits_pools(digits_root):
    """(model pool, task pool) of the embedded default pool, sharing the session's build."""
    from mergebench_digits import DigitsModelPool, DigitsTaskPool, Recipe

    return DigitsModelPool(Recipe(), digits_root), DigitsTaskPool(Recipe(), digits_root)


@pytest.fixture()
def cli_env(session_cache, tmp_path, monkeypatch):
    """Environment for CLI tests: the session's built pool, and a fresh results store in a temporary folder."""
    monkeypatch.setenv("MERGEBENCH_CACHE", str(session_cache))
    monkeypatch.setenv("MERGEBENCH_STORE", str(tmp_path / "results.sqlite"))
    monkeypatch.chdir(tmp_path)
    return tmp_path
