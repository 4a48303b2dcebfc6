"""The upscaled and test-time methods on the CLIP pool's real module layout, offline: what a GPU run of
`mergebench run -m wemoe -p clip-vit-b32_TA8` goes through, on tiny random CLIP towers (a few steps each).

The methods' numbers are checked against FusionBench's modules in their own tests; this checks that each finds the
CLIP vision tower's MLPs and Linear layers, trains on the CLIP task pool's unlabeled test images, and stores a cell
with its size against the base. (The first version of this test found that none of the trained ones could:
the task pool kept its heads as inference tensors from the first evaluation.)"""

from __future__ import annotations

import pytest

from mergebench_core.cli import main
from mergebench_core.results.store import ResultStore
from mergebench_clip_tasks.testing import build_offline_world

LIMIT = 4
PLUGINS = {"wemoe": "mergebench_wemoe", "rankone_moe": "mergebench_rankone_moe", "smile": "mergebench_smile",
           "surgery": "mergebench_surgery", "cart_adamerging": "mergebench_cart_adamerging",
           "concrete": "mergebench_concrete", "adarank": "mergebench_adarank", "adamerging": "mergebench_adamerging",
           "task_arithmetic": "mergebench_task_arithmetic"}
STEPS = ["wemoe.steps=2", "sparse_wemoe.steps=2", "rankone_moe.steps=2", "surgery.steps=2",
         "surgery.base=task_arithmetic", "cart_adamerging.steps=2", "concrete_ta.steps=2", "adarank.steps=2",
         "adamerging_lw.steps=2"]
UPSCALED = {"wemoe", "sparse_wemoe", "rankone_moe", "smile"}
TEST_TIME = {"surgery", "cart_adamerging", "concrete_ta", "adarank", "adamerging_lw"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_offline_world(tmp_path_factory.mktemp("clip-world"), "b32", "TA8", n_images=LIMIT + 2)


def test_upscaled_and_test_time_methods_run_on_the_clip_pool(world, tmp_path, monkeypatch, capsys):
    for module in PLUGINS.values():
        pytest.importorskip(module)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(world.hub_cache))
    monkeypatch.setenv("MERGEBENCH_CLIP_DATA_DIR", str(world.data_dir))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEBENCH_PLUGINS", ",".join(["clip", "clip_tasks", *PLUGINS]))
    import mergebench_core.contract.registry as registry

    monkeypatch.setattr(registry, "_REGISTRY", None)
    store = tmp_path / "results.sqlite"
    methods = sorted(UPSCALED | TEST_TIME)
    code = main(["run", "-m", ",".join(methods), "-p", "clip-vit-b32_TA8", "--limit", str(LIMIT),
                 "--store", str(store), *STEPS])
    assert code == 0, capsys.readouterr().err
    rows = {r.method: r for r in ResultStore(store, readonly=True).all() if r.kind == "method"}
    assert set(methods) <= set(rows)
    for name in methods:
        row = rows[name]
        assert row.status == "ok", (name, row.error)
        assert set(row.metrics) == set(world.tasks), name
        assert all(m["examples"] == LIMIT for m in row.metrics.values()), name
    base_sizes = set()
    for name in UPSCALED:
        extras = rows[name].extras
        assert extras["params_ratio"] > 1, (name, extras)
        assert extras["parameters"] == pytest.approx(extras["params_ratio"] * extras["base_parameters"])
        base_sizes.add(extras["base_parameters"])
    assert len(base_sizes) == 1  # the same vision tower counted for every method
    for name in TEST_TIME - {"surgery"}:
        assert "params_ratio" not in rows[name].extras, name  # a static model of the base architecture
    assert rows["surgery"].task_specific and not rows["adarank"].task_specific  # Surgery needs the task id
