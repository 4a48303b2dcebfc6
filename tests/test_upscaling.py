"""The upscaled-model kind: the core loop trains on the split it is given, sizes are counted once per tensor, the
stored cell carries `params ×` and the tables show it only where some row has it, and `merge` refuses the kind."""

from __future__ import annotations

import torch
from torch import nn

from mergebench_core import MethodInfo
from mergebench_core.cli import main
from mergebench_core.contract.api import file_refusal
from mergebench_core.results.leaderboard import render
from mergebench_core.results.store import CellResult, ResultStore
from mergebench_core.training.loop import TrainConfig, train
from mergebench_core.upscaling import UpscaleMethod, count_parameters, size_report

POOL = "digits-mlp_TA8"


def test_train_draws_batches_from_the_split_it_is_given(digits_pools):
    pool, taskpool = digits_pools
    test_rows = {tuple(x.tolist()) for xs, _ in taskpool.batches("digits", "test") for x in xs}
    train_rows = {tuple(x.tolist()) for xs, _ in taskpool.batches("digits", "train") for x in xs}
    seen: list[torch.Tensor] = []

    def loss(model, batches, state):
        seen.extend(batches["digits"][0])
        return model(batches["digits"][0]).pow(2).mean()

    model = pool.load_model("_pretrained_")
    train(model, taskpool, ["digits"], loss, TrainConfig(steps=3, batch_size=16), seed=0, split="test")
    rows = {tuple(x.tolist()) for x in seen}
    assert len(seen) == 48 and rows <= test_rows and not rows & (train_rows - test_rows)


def test_sizes_count_every_tensor_once():
    shared = nn.Linear(3, 2)
    model = nn.Sequential(shared, shared, nn.BatchNorm1d(2))  # a shared module, and buffers
    assert count_parameters(model) == 8 + (2 + 2) + (2 + 2 + 1)  # the Linear once; BN affine, its 3 buffers
    report = size_report(model, nn.Linear(3, 2))
    assert report["params_ratio"] == count_parameters(model) / 8


def test_merge_refuses_an_upscaled_model_with_the_reason():
    class Tiny(UpscaleMethod):
        name = "tiny"
        Params = dict
        info = MethodInfo(kind="upscale", data="none", task_vectors=True)

        def upscale(self, base, experts, ctx, skip):
            return base

    files = type("Files", (), {"files_only": True, "name": "files"})()
    reason = file_refusal(Tiny, files)
    assert reason is not None and "upscaled model" in reason and "mergebench run --method tiny" in reason


def _cell(method: str, ratio: float | None) -> CellResult:
    extras = {} if ratio is None else {"params_ratio": ratio}
    return CellResult("method", method, {}, POOL, "digits_TA8", metrics={"digits": {"accuracy": 0.9}}, mean=0.9,
                      extras=extras)


def test_tables_show_params_only_where_a_row_has_it():
    with_upscaled = render([_cell("ties", None), _cell("wemoe", 6.27)])
    assert "Params ×" in with_upscaled and "6.27" in with_upscaled
    assert "Params ×" not in render([_cell("ties", None)])
    assert "Params ×" in render([_cell("wemoe", 6.27)], columns="-merge")  # removals keep it…
    assert "Params ×" not in render([_cell("wemoe", 6.27)], columns="-merge,-params")
    assert "Params ×" in render([_cell("wemoe", 6.27)], columns="avg,params")  # …and it can be named
    assert "params_x" in render([_cell("wemoe", 6.27)], fmt="csv")


def test_an_upscaled_cell_stores_its_size(cli_env):
    assert main(["run", "-m", "smile", "-p", POOL, "--tasks", "digits"]) == 0
    cells = [c for c in ResultStore(cli_env / "results.sqlite").all() if c.method == "smile"]
    assert len(cells) == 1 and cells[0].status == "ok"
    extras = cells[0].extras
    assert extras["parameters"] > extras["base_parameters"] > 0
    assert abs(extras["params_ratio"] - extras["parameters"] / extras["base_parameters"]) < 1e-12


def test_a_model_with_nothing_to_upscale_is_refused_before_any_work():
    class Tiny(UpscaleMethod):
        name = "tiny"
        Params = dict
        info = MethodInfo(kind="upscale", data="none", task_vectors=True)

        def upscale(self, base, experts, ctx, skip):
            return base

    def pool_of(model):
        return type("Pool", (), {"name": "p", "relation": "finetuned", "has_pretrained": True, "files_only": False,
                                 "build_model": staticmethod(lambda: model)})()

    reason = Tiny.refusal(pool_of(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))), {})
    assert reason is not None and "MLP blocks (or Linear layers)" in reason and "Sequential" in reason
    assert Tiny.refusal(pool_of(nn.Sequential(nn.Linear(3, 4))), {}) is None
