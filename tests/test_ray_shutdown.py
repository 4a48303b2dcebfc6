"""A local Ray that `--executor ray` started is shut down when the grid ends; a Ray the caller started stays up."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mergebench_core.cli import main
from mergebench_core.contract import registry as registry_module

ray = pytest.importorskip("ray")
GRID = ["run", "-m", "task_arithmetic", "-p", "digits-mlp_TA8", "--tasks", "digits,rot90", "--executor", "ray"]


def _children() -> list[str]:
    """The command names of this process's living child processes (Ray's raylet, GCS server, monitors...)."""
    names = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # ended meanwhile
            continue
        name, _, rest = text.partition(" (")[2].rpartition(")")
        state, ppid = rest.split()[:2]
        if int(ppid) == os.getpid() and state not in ("Z", "X"):
            names.append(name)
    return names


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
def test_a_local_ray_the_run_started_is_shut_down_when_the_run_ends(cli_env, monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", None)  # the installed plugins, as the Ray workers see them
    assert not ray.is_initialized()
    before = _children()
    assert main(GRID) == 0
    assert not ray.is_initialized()
    deadline = time.monotonic() + 10
    while sorted(_children()) != sorted(before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(_children()) == sorted(before)  # its raylet, GCS server and monitors are gone


def test_a_ray_the_caller_started_stays_up(cli_env, monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(GRID) == 0
        assert ray.is_initialized()
    finally:
        ray.shutdown()
