"""The Ray executor runs a small grid on a local Ray and matches the local results exactly."""

import pytest

from mergebench_core import registry as registry_module
from mergebench_core.cli import main
from mergebench_core.results.store import ResultStore

ray = pytest.importorskip("ray")
POOL = "digits-mlp_TA8"


@pytest.fixture()
def local_ray(monkeypatch, session_cache):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(session_cache))  # Ray workers inherit the environment at start
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_grid_on_local_ray_matches_local_workers(cli_env, local_ray, capsys, monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", None)  # the installed plugins, as the Ray workers see them
    grid = ["-m", "task_arithmetic,ties,pa_task_arithmetic", "-p", POOL, "--tasks", "digits,rot90",
            "--preference", "0.3,0.7", "method.scaling_factor=0.3,0.5"]
    assert main(["run", *grid, "--store", "local.sqlite"]) == 0
    assert main(["run", *grid, "--store", "ray.sqlite", "--executor", "ray"]) == 0
    local = {r.cell_key: r for r in ResultStore(cli_env / "local.sqlite").all()}
    remote = {r.cell_key: r for r in ResultStore(cli_env / "ray.sqlite").all()}
    assert set(local) == set(remote) and len(local) == 2 + 3 * 2
    for key, row in local.items():
        assert remote[key].status == "ok" and remote[key].metrics == row.metrics, row.method
        assert remote[key].normalized_mean == row.normalized_mean
