"""Cells that cannot hurt each other: faulty methods fail their own cell, and the others' numbers are unchanged."""

import ctypes
import os
import sys
import time
import types
from dataclasses import dataclass

import pytest
import torch

from mergebench_core import Method, MethodInfo, hookimpl
from mergebench_core import registry as registry_module
from mergebench_core.cli import main
from mergebench_core.running.executors import can_fork
from mergebench_core.results.store import ResultStore

pytestmark = pytest.mark.skipif(not can_fork(), reason="worker processes need fork")
POOL = "digits-mlp_TA8"
TWO = ["--tasks", "digits,rot90"]


@dataclass
class NoParams:
    pass


def faulty(name, action):
    """A method that does `action(pool, ctx)` and then returns the pretrained model."""

    class Faulty(Method):
        Params = NoParams
        info = MethodInfo()

        def run(self, pool, ctx):
            model = action(pool, ctx)
            from mergebench_core import MergeOutput
            return MergeOutput(model if model is not None else pool.load_model("_pretrained_"))

    Faulty.name = name
    Faulty.__doc__ = f"Fails on purpose: {name}."
    return Faulty


def _nan(pool, ctx, value=float("nan")):
    model = pool.load_model("_pretrained_")
    with torch.no_grad():
        model.fc2.weight[0, :3] = value
    return model


def _mutate_heads(pool, ctx):
    for head in ctx.taskpool.heads.values():
        with torch.no_grad():
            head.weight.mul_(-1.0)  # every later evaluation through these heads would be wrong


FAULTS = {
    "hangs": lambda pool, ctx: time.sleep(3600),
    "exits_hard": lambda pool, ctx: os._exit(1),
    "segfaults": lambda pool, ctx: ctypes.string_at(0),
    "exits_cleanly": lambda pool, ctx: sys.exit(0),
    "returns_nan": _nan,
    "returns_inf": lambda pool, ctx: _nan(pool, ctx, float("inf")),
    "mutates_heads": _mutate_heads,
    "sets_dtype": lambda pool, ctx: torch.set_default_dtype(torch.float64),
}
REASONS = {
    "hangs": "timeout: the cell ran past --cell-timeout",
    "exits_hard": "the worker exited with code 1",
    "segfaults": "killed by SIGSEGV",
    "exits_cleanly": "the cell called sys.exit(0)",
    "returns_nan": "fc2.weight has 3 NaN or infinite entries",
    "returns_inf": "fc2.weight has 3 NaN or infinite entries",
}


@pytest.fixture()
def faulty_plugins(monkeypatch):
    plugin = types.ModuleType("faulty_plugins")

    @hookimpl
    def register_methods(register):
        for name, action in FAULTS.items():
            register(faulty(name, action))

    plugin.register_methods = register_methods
    registry = registry_module.build_registry(extra_modules=[plugin])
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)


def test_a_grid_of_faulty_methods_fails_only_their_cells(cli_env, capsys, faulty_plugins):
    assert main(["run", "-m", "task_arithmetic,ties", "-p", POOL, *TWO, "--store", "clean.sqlite"]) == 0
    clean = {r.method: r.metrics for r in ResultStore(cli_env / "clean.sqlite").all()}
    capsys.readouterr()

    # the faulty ones first, so that anything they leak would reach the good cells
    methods = ",".join([*FAULTS, "task_arithmetic", "ties"])
    assert main(["run", "-m", methods, "-p", POOL, *TWO, "--cell-timeout", "20"]) == 1
    out, err = capsys.readouterr()
    rows = {r.method: r for r in ResultStore(cli_env / "results.sqlite").all()}
    for name, reason in REASONS.items():
        assert rows[name].status == "failed" and reason in rows[name].error, (name, rows[name].error)
    assert rows["mutates_heads"].status == "ok"  # it hurt only itself: negated heads, its own (bad) score
    assert rows["mutates_heads"].mean < rows["task_arithmetic"].mean
    assert "sets_dtype" in rows  # float64 weights meet float32 heads: ok or failed, but only its own cell
    for name in ("task_arithmetic", "ties"):  # after all of that, exactly a clean run's numbers
        assert rows[name].status == "ok" and rows[name].metrics == clean[name]
    assert "| task_arithmetic" in out and "| ties" in out  # the table is printed
    assert f"{sum(r.status != 'ok' for r in rows.values())} cell(s) failed" in err
    assert torch.get_default_dtype() == torch.float32  # nor did anything leak into this process
