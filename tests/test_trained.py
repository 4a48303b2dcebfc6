"""Training methods: the trained-model cache, --eval-only, derived pools and the loggers, on the embedded pool."""

import json
import types

import pytest
import torch

from mergebench_core import hookimpl
from mergebench_core import registry as registry_module
from mergebench_core import trained as trained_module
from mergebench_core.cli import main
from mergebench_core.results.store import ResultStore

POOL = "digits-mlp_TA8"
DERIVED = "digits-mlp_TA8+finetune(steps=20)"


def stored(tmp_path):
    return ResultStore(tmp_path / "results.sqlite").all()


@pytest.fixture()
def count_trainings(monkeypatch):
    """Counts calls of the core's training loop made by training methods."""
    calls = []
    real = trained_module.train

    def counting(*args, **kwargs):
        calls.append(args[2])  # the tasks
        return real(*args, **kwargs)

    monkeypatch.setattr(trained_module, "train", counting)
    return calls


@pytest.fixture()
def fresh_cache(cli_env, session_cache, monkeypatch):
    """The session's built digits pool, with a trained-model cache of this test's own."""
    cache = cli_env / "cache"
    (cache / "pools").mkdir(parents=True)
    (cache / "pools" / "digits").symlink_to(session_cache / "pools" / "digits")
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))
    return cache


def trained_files(cache, method):
    return sorted((cache / "trained" / method).glob("*.safetensors"))


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_a_training_cell_trains_once_then_reuses_its_cached_model(fresh_cache, count_trainings, capsys, isolation):
    argv = ["run", "-m", "linear_scalarization", "-p", POOL, "--tasks", "digits,rot90", "--isolation", isolation,
            "linear_scalarization.steps=15", "--preference", "0.8,0.2"]
    calls = count_trainings if isolation == "none" else None  # a worker's calls are counted in the worker
    assert main(argv) == 0
    assert calls is None or calls == [["digits", "rot90"]]
    first = stored(fresh_cache.parent)
    cell = next(r for r in first if r.method == "linear_scalarization")
    assert cell.extras["trained_now"] is True and cell.preference == [0.8, 0.2]
    [model] = trained_files(fresh_cache, "linear_scalarization")
    written = model.stat().st_mtime_ns

    assert main([*argv, "--rerun"]) == 0  # the cell is recomputed, the model is not retrained
    assert calls is None or len(calls) == 1
    again = next(r for r in stored(fresh_cache.parent) if r.method == "linear_scalarization")
    assert again.extras["trained_now"] is False and again.metrics == cell.metrics

    assert main([*argv, "--rerun", "--eval-only"]) == 0
    assert calls is None or len(calls) == 1
    assert trained_files(fresh_cache, "linear_scalarization") == [model] and model.stat().st_mtime_ns == written


def test_the_same_seed_trains_the_same_bits(fresh_cache, tmp_path, monkeypatch, capsys):
    argv = ["run", "-m", "linear_scalarization", "-p", POOL, "--tasks", "digits", "linear_scalarization.steps=10"]
    assert main(argv) == 0
    [first] = trained_files(fresh_cache, "linear_scalarization")
    weights = first.read_bytes()
    first.unlink()
    assert main([*argv, "--rerun"]) == 0
    assert first.read_bytes() == weights


def test_eval_only_without_a_cached_model_exits_2_and_writes_nothing(fresh_cache, count_trainings, capsys):
    argv = ["run", "-m", "linear_scalarization", "-p", POOL, "--tasks", "digits,rot90", "--eval-only",
            "--preference", "0.3,0.7"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--eval-only" in err and "linear_scalarization on digits-mlp_TA8[digits,rot90]" in err
    assert "Run without --eval-only" in err
    assert not (fresh_cache.parent / "results.sqlite").exists() and count_trainings == []

    assert main(["run", "-m", "task_arithmetic", "-p", DERIVED, "--tasks", "digits", "--eval-only"]) == 2
    assert "the experts of derived pool" in capsys.readouterr().err and count_trainings == []


def test_a_derived_pool_runs_merge_methods_unchanged(fresh_cache, count_trainings, capsys):
    methods = "task_arithmetic,ties,fisher,regmean,simple_average"
    assert main(["run", "-m", methods, "-p", DERIVED, "--tasks", "digits,rot90"]) == 0
    out = capsys.readouterr().out
    name = f"{DERIVED}[digits,rot90]"
    assert f"### {name} on digits_TA8[digits,rot90]" in out
    assert sorted(count_trainings) == [["digits"], ["rot90"]]  # one expert per task, trained once each
    curves = sorted((fresh_cache.parent / "results.logs" / "derived").rglob("*.jsonl"))
    assert [c.stem for c in curves] == ["digits", "rot90"]  # each expert's training curve, beside the store
    assert len(curves[0].read_text().splitlines()) == 20
    rows = {r.method: r for r in stored(fresh_cache.parent)}
    assert set(rows) == {"pretrained", "individual", *methods.split(",")}
    assert all(r.status == "ok" and r.modelpool == name for r in rows.values())
    assert rows["individual"].mean > rows["pretrained"].mean
    assert "derived_recipe" in rows["ties"].versions

    # the whole pool shares the two experts already trained, and trains the others only when asked for
    assert main(["run", "-m", "task_arithmetic", "-p", DERIVED, "--tasks", "digits,rot90,mirror"]) == 0
    assert sorted(count_trainings) == [["digits"], ["mirror"], ["rot90"]]

    # the derived experts are not the pool's own experts
    from mergebench_core.running.runner import Runner, RunOptions

    runner = Runner(registry_module.get_registry(), None, RunOptions(cache_dir=fresh_cache))
    derived, base = runner.modelpool(DERIVED), runner.modelpool(POOL)
    assert derived.identity("digits") != base.identity("digits")
    assert not torch.equal(derived.state_dict("digits")["fc1.weight"], base.state_dict("digits")["fc1.weight"])
    assert torch.equal(derived.state_dict("_pretrained_")["fc1.weight"], base.state_dict("_pretrained_")["fc1.weight"])


def test_a_pool_deriving_method_run_as_a_cell_scores_its_experts(fresh_cache, capsys):
    assert main(["run", "-m", "finetune", "-p", POOL, "--tasks", "digits,rot90", "finetune.steps=20"]) == 0
    cell = next(r for r in stored(fresh_cache.parent) if r.method == "finetune")
    assert cell.task_specific and set(cell.metrics) == {"digits", "rot90"}
    assert cell.mean > 0.8


def test_bad_derived_pool_names(fresh_cache, capsys):
    assert main(["run", "-m", "ties", "-p", f"{POOL}+ties"]) == 2
    assert "does not re-train experts" in capsys.readouterr().err
    assert main(["run", "-m", "ties", "-p", f"{POOL}+finetun"]) == 2
    assert "Did you mean 'finetune'" in capsys.readouterr().err
    assert main(["run", "-m", "ties", "-p", f"{POOL}+finetune(stepz=3)"]) == 2
    assert "Did you mean 'steps'" in capsys.readouterr().err


def test_curves_go_to_json_lines_beside_the_store_and_to_registered_loggers(fresh_cache, monkeypatch, capsys):
    sink = fresh_cache.parent / "list-logger.jsonl"  # cells run in workers: the logger writes where this test reads

    class ListLogger:
        def __init__(self, run, info):
            self.run = run

        def log(self, step, metrics):
            with sink.open("a") as fh:
                fh.write(json.dumps([step, dict(metrics)]) + "\n")

        def close(self):
            with sink.open("a") as fh:
                fh.write(json.dumps("closed") + "\n")

    plugin = types.ModuleType("list_logger")

    @hookimpl
    def register_loggers(register):
        register("list", ListLogger)

    plugin.register_loggers = register_loggers
    registry = registry_module.build_registry(extra_modules=[plugin])
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)
    argv = ["run", "-m", "linear_scalarization", "-p", POOL, "--tasks", "digits", "linear_scalarization.steps=6",
            "--logger", "list"]
    assert main(argv) == 0
    seen = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [s for s, _ in seen[:-1]] == [1, 2, 3, 4, 5, 6] and seen[-1] == "closed"
    assert {"loss", "lr", "loss/train/digits"} <= set(seen[0][1])
    capsys.readouterr()
    assert main(["show", "--method", "linear_scalarization", "--curves"]) == 0
    shown = next(c for c in json.loads(capsys.readouterr().out) if "training_log" in c)  # one JSON list of cells
    assert shown["training_log"]["steps"] == 6 and len(shown["training_log"]["rows"]) == 6
    assert shown["training_log"]["last"]["step"] == 6
    assert main([*argv, "--logger", "nope", "--rerun"]) == 2
    assert "unknown logger 'nope'" in capsys.readouterr().err


def test_pool_names_with_several_parameters_and_tasks_pass_through_the_command_line(fresh_cache, capsys):
    name = "digits-mlp_TA8+finetune(steps=5,lr=0.001)[digits,rot90]"
    assert main(["run", "-m", "task_arithmetic", "-p", f"{name},{POOL}[digits]"]) == 0
    pools = {r.modelpool for r in stored(fresh_cache.parent)}
    assert pools == {name, f"{POOL}[digits]"}
