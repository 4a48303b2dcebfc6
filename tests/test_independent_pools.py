"""Pools of independently trained models: task-vector methods are refused before any work; fusion runs."""

from mergebench_core.cli import main
from mergebench_core.results.store import ResultStore

SEEDS = "digits-mlp_seeds"


def test_a_task_vector_method_on_an_independent_pool_exits_2_and_writes_nothing(cli_env, capsys):
    for method in ("task_arithmetic", "ties", "adamerging_tw", "pa_task_arithmetic", "linear_scalarization"):
        assert main(["run", "-m", method, "-p", SEEDS]) == 2
        err = capsys.readouterr().err
        assert f"{method} on {SEEDS}" in err
        assert "independently trained models" in err or "has none" in err
    assert not (cli_env / "results.sqlite").exists()


def test_every_method_on_an_independent_pool_skips_task_vector_methods_and_fuses(cli_env, capsys):
    assert main(["run", "-p", SEEDS, "-m", "git_rebasin,simple_average,ensemble"]) == 0
    rows = {r.method: r for r in ResultStore(cli_env / "results.sqlite").all()}
    assert set(rows) == {"model seed0", "model seed1", "best model", "git_rebasin", "simple_average", "ensemble"}
    best = max(rows["model seed0"].mean, rows["model seed1"].mean)
    assert rows["best model"].mean == best and rows["best model"].kind == "reference"
    assert rows["git_rebasin"].mean > rows["simple_average"].mean + 0.1  # alignment matters
    assert rows["git_rebasin"].mean <= best + 0.01
    out = capsys.readouterr().out
    assert "| Model seed0" in out and "| git_rebasin" in out

    assert main(["run", "-p", SEEDS]) == 0  # every installed method: the impossible ones are listed once, not run
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "it works on task vectors" in x)
    assert line.startswith("(not run: adamerging_lw, adamerging_pp, adamerging_tw, breadcrumbs")
    assert ", task_arithmetic, ties, tsv_m, wudi on digits-mlp_seeds: it works on task vectors" in line
