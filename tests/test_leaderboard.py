"""Leaderboard tables: rows that name their configuration, seeds as mean ± std with n, columns, and each format."""

import csv
import io
import json
import os
import shutil
import statistics
import subprocess

import pytest

from mergebench_core.cli import main
from mergebench_core.errors import MergebenchError
from mergebench_core.results.leaderboard import build_tables, render
from mergebench_core.results.store import CellResult, ResultStore

TASKS = ("a", "b")
TIES_DEFAULTS = {"scaling_factor": 0.3, "k": 0.2, "combine": "sum", "scope": "global"}


def cell(method, params=None, seed=0, a=0.5, b=0.5, kind="method", **kw):
    return CellResult(kind=kind, method=method, params=dict(params or {}), modelpool="mp", taskpool="tp", seed=seed,
                      metrics={"a": {"accuracy": a, "loss": 1 - a}, "b": {"accuracy": b, "loss": 1 - b}},
                      mean=(a + b) / 2, normalized_mean=(a / 0.9 + b / 0.9) / 2,
                      merge_seconds=kw.pop("merge_seconds", 0.5), peak_memory_mb=kw.pop("peak_memory_mb", 100.0),
                      versions={"mergebench": "0.1.0"}, **kw)


def references():
    return [cell("pretrained", kind="reference", a=0.6, b=0.5), cell("individual", kind="reference", a=0.9, b=0.9)]


def defaults(name):
    return {"ties": TIES_DEFAULTS, "ta": {"scaling_factor": 0.3}}.get(name)


def body_rows(text):
    """{label: cells} of a github table."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|--"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


SEEDED = [*references(),
          cell("ties", dict(TIES_DEFAULTS, k=0.1), seed=0, a=0.80, b=0.70),
          cell("ties", dict(TIES_DEFAULTS, k=0.1), seed=1, a=0.82, b=0.74),
          cell("ties", dict(TIES_DEFAULTS, k=0.1), seed=2, a=0.84, b=0.72),
          cell("ties", TIES_DEFAULTS, seed=0, a=0.70, b=0.70)]


# --- labels --------------------------------------------------------------------------------------------------------
def test_non_default_parameters_always_show_even_alone():
    rows = [*references(), cell("ties", dict(TIES_DEFAULTS, k=0.1)), cell("ta", {"scaling_factor": 0.4}),
            cell("ta", {"scaling_factor": 0.3}, a=0.4)]
    table = body_rows(render(rows, defaults=defaults))
    assert "ties (k=0.1)" in table  # the only ties row: a varying-only rule would print bare `ties`
    assert "ta (scaling_factor=0.4)" in table and "ta" in table  # the default one stays bare


def test_installed_methods_defaults_come_from_the_registry():
    rows = [cell("task_arithmetic", {"scaling_factor": 0.4}), cell("ties", dict(TIES_DEFAULTS, combine="mean"))]
    table = body_rows(render(rows))
    assert set(table) >= {"Method", "task_arithmetic (scaling_factor=0.4)", "ties (combine=mean)"}


def test_uninstalled_method_falls_back_to_varying_parameters():
    rows = [cell("not_installed", {"x": 1, "y": "same"}), cell("not_installed", {"x": 2, "y": "same"})]
    assert {"not_installed (x=1)", "not_installed (x=2)"} <= set(body_rows(render(rows, defaults=defaults)))
    assert "not_installed" in body_rows(render(rows[:1], defaults=defaults))


def test_preference_limit_and_a_lone_non_zero_seed_are_named():
    rows = [cell("ta", {"scaling_factor": 0.3}, preference=[0.25, 0.75]),
            cell("ta", {"scaling_factor": 0.3}, eval_limit=64), cell("ties", TIES_DEFAULTS, seed=5),
            cell("long", {"weights": [0.125] * 8}, task_specific=True)]
    labels = set(body_rows(render(rows, defaults=lambda m: {"weights": None} if m == "long" else defaults(m))))
    assert {"ta (r=(0.25, 0.75))", "ta (limit=64)", "ties (seed=5)"} <= labels
    assert "long† (weights=[0.125,0.125,0.125,0.12…)" in labels  # long values shortened in labels only


# --- seeds ---------------------------------------------------------------------------------------------------------
def test_seeds_aggregate_to_mean_std_and_n():
    text = render(SEEDED, defaults=defaults)
    table = body_rows(text)
    assert table["Method"][:3] == ["n", "a", "b"]
    a_std = statistics.stdev([80, 82, 84])
    assert table["ties (k=0.1)"][:3] == ["3", f"82.0 ± {a_std:.1f}", "72.0 ± 2.0"]
    assert table["ties"][:3] == ["1", "70.0", "70.0"]  # one seed: no ± part
    assert "Mean ± sample standard deviation over n seeds." in text
    assert list(table).index("ties (k=0.1)") < list(table).index("ties")  # sorted by the seed mean


def test_per_seed_rows_on_request():
    table = body_rows(render(SEEDED, per_seed=True, defaults=defaults))
    assert {"ties (k=0.1, seed=0)", "ties (k=0.1, seed=1)", "ties (k=0.1, seed=2)", "ties"} <= set(table)
    assert "n" not in table["Method"]


def test_the_newest_cell_of_a_seed_wins():
    old = cell("ties", TIES_DEFAULTS, a=0.1, created_at=1.0)
    new = cell("ties", TIES_DEFAULTS, a=0.9, created_at=2.0)
    (table,) = build_tables([new, old], defaults=defaults)
    (row,) = table.methods
    assert row.n == 1 and row.scores["a"].mean == 0.9


def test_history_keeps_superseded_cells_as_their_own_rows():
    old = cell("ties", TIES_DEFAULTS, a=0.1, created_at=1.0, identity={"plugin": "ties==0.1"})
    new = cell("ties", TIES_DEFAULTS, a=0.9, created_at=2.0, identity={"plugin": "ties==0.2"})
    labels = list(body_rows(render([old, new], history=True, defaults=defaults)))
    assert labels[1] == "ties" and labels[2].startswith("ties (superseded 1970-01-01")


# --- columns -------------------------------------------------------------------------------------------------------
def test_columns_choose_and_drop():
    header = body_rows(render(SEEDED, columns="avg,b", defaults=defaults))["Method"]
    assert header == ["n", "Avg.", "b"]
    header = body_rows(render(SEEDED, columns=["-merge", "-mem", "-a"], defaults=defaults))["Method"]
    assert header == ["n", "b", "Avg.", "Norm."]
    header = body_rows(render(SEEDED, columns="tasks,Avg.,eval", defaults=defaults))["Method"]
    assert header == ["n", "a", "b", "Avg.", "Eval (s)"]


def test_unknown_or_mixed_columns_are_errors():
    with pytest.raises(MergebenchError, match=r"unknown column 'nrom'. Did you mean 'norm'\?.*Columns: tasks, a, b"):
        render(SEEDED, columns="avg,nrom")
    with pytest.raises(MergebenchError, match="either list the columns"):
        render(SEEDED, columns="avg,-merge")


# --- formats -------------------------------------------------------------------------------------------------------
def test_csv_has_identity_columns_and_std():
    rows = [*SEEDED, cell("tall_masks", {"tall_mask_lambda": 0.6}, task_specific=True),
            cell("boom", {"x": 1}, status="failed", error="RuntimeError: no")]
    text = render(rows, "csv", columns="-merge,-mem", defaults=defaults)
    records = list(csv.DictReader(io.StringIO(text)))
    assert list(records[0])[:12] == ["modelpool", "taskpool", "kind", "method", "label", "task_specific", "params",
                                     "non_default_params", "preference", "eval_limit", "seeds", "n"]
    ties = next(r for r in records if r["label"] == "ties (k=0.1)")
    assert ties["method"] == "ties" and json.loads(ties["params"])["k"] == 0.1
    assert json.loads(ties["non_default_params"]) == {"k": 0.1}
    assert ties["seeds"] == "0 1 2" and ties["n"] == "3"
    assert float(ties["a"]) == pytest.approx(82.0) and float(ties["a_std"]) == pytest.approx(2.0)
    assert "merge_s" not in ties and "avg_std" in ties
    masks = next(r for r in records if r["method"] == "tall_masks")
    assert masks["task_specific"] == "1" and "†" not in text  # the mark is a column, never glued to the name
    failed = next(r for r in records if r["method"] == "boom")
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: no"


def test_json_rows_carry_parameters_seeds_and_std():
    data = json.loads(render(SEEDED, "json", defaults=defaults))
    ties = next(r for r in data if r["label"] == "ties (k=0.1)")
    assert ties["params"] == dict(TIES_DEFAULTS, k=0.1) and ties["non_default_params"] == {"k": 0.1}
    assert ties["seeds"] == [0, 1, 2] and ties["n"] == 3
    assert ties["scores"]["a"]["mean"] == pytest.approx(0.82) and ties["scores"]["a"]["std"] == pytest.approx(0.02)
    assert ties["scores"]["a"]["metric"] == "accuracy"
    assert ties["metrics"]["b"]["loss"]["mean"] == pytest.approx(0.28)
    assert ties["avg"]["std"] is not None and len(ties["cells"]) == 3 and "cell_key" in ties["cells"][0]
    assert [r["method"] for r in data[:2]] == ["pretrained", "individual"]


def test_github_marks_task_specific_rows_and_lists_failures():
    rows = [*references(), cell("tall_masks", {}, task_specific=True),
            cell("boom", {"x": 1}, seed=1, status="failed", error="RuntimeError: no")]
    text = render(rows, defaults=lambda m: {} if m == "tall_masks" else None)
    assert "| tall_masks† " in text and "† one model per task" in text
    assert "FAILED boom (x=1) seed=1: RuntimeError: no" in text


def latex_rows(text):
    return [line for line in text.splitlines() if line.endswith(r"\\")]


def test_latex_is_booktabs_with_aligned_numbers_and_marks():
    rows = [*SEEDED, cell("tall_masks", {}, task_specific=True, a=0.75, b=0.69)]
    text = render(rows, "latex", columns="tasks,avg", defaults=lambda m: {} if m == "tall_masks" else defaults(m))
    assert r"\toprule" in text and r"\bottomrule" in text and r"\hline" not in text
    lines = text.splitlines()
    spec = next(line for line in lines if line.startswith(r"\begin{tabular}"))
    assert spec == r"\begin{tabular}{lr" + "r@{}l" * 3 + "}"  # label, n, each number right-aligned, ± std beside
    refs_end = lines.index(next(l for l in lines if l.startswith("Individual (experts)")))
    assert lines[refs_end + 1] == r"\midrule"  # a rule after the reference rows
    body = latex_rows(text)
    assert body[0].startswith("Method & $n$ & \\multicolumn{2}{c}{a}")
    best = next(l for l in body if l.startswith("ties (k=0.1)"))
    assert r"\textbf{82.0} & ${}\pm{}$2.0" in best  # best in a, with its std
    second = next(l for l in body if l.startswith(r"tall\_masks$^\dagger$"))
    assert r"\underline{75.0}" in second
    assert r"\textbf" not in next(l for l in body if l.startswith("Individual"))  # references are not ranked
    assert r"$^\dagger$\,One model per task" in text  # the dagger explained below the table
    assert "mean $\\pm$ sample standard deviation over $n$ seeds" in text


def test_latex_escapes_and_compiles(tmp_path):
    rows = [*SEEDED, cell("tall_masks", {"t_x": "a&b%"}, task_specific=True, status="ok"),
            cell("boom", {"x": 1}, status="failed", error="RuntimeError: 50% & more")]
    text = render(rows, "latex", defaults=lambda m: {} if m == "tall_masks" else defaults(m))
    assert r"t\_x=a\&b\%" in text and "% FAILED boom" in text
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        if os.environ.get("CI"):
            pytest.fail("pdflatex is missing: .ci/run installs texlive-latex-recommended")
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-recommended)")
    (tmp_path / "table.tex").write_text(text)
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                      "\\input{table.tex}\n\\end{document}\n")
    proc = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], check=False,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "doc.pdf").read_bytes().startswith(b"%PDF")
    assert "Undefined control sequence" not in proc.stdout


# --- the command line ----------------------------------------------------------------------------------------------
@pytest.fixture()
def store_env(tmp_path, monkeypatch):
    path = tmp_path / "results.sqlite"
    monkeypatch.setenv("MERGEBENCH_STORE", str(path))
    monkeypatch.chdir(tmp_path)
    store = ResultStore(path)
    for i, c in enumerate(SEEDED):
        c.created_at = 1000.0 + i
        store.put(c)
    store.close()
    return path


def test_leaderboard_columns_per_seed_and_out(store_env, capsys):
    assert main(["leaderboard", "--store", str(store_env), "--columns", "avg,norm"]) == 0
    assert body_rows(capsys.readouterr().out)["Method"] == ["n", "Avg.", "Norm."]
    assert main(["leaderboard", "--store", str(store_env), "--columns=-merge,-mem", "--per-seed"]) == 0
    table = body_rows(capsys.readouterr().out)
    assert "Merge (s)" not in table["Method"] and "ties (k=0.1, seed=2)" in table
    assert main(["leaderboard", "--store", str(store_env), "--columns", "avg,nrom"]) == 2
    assert "Did you mean 'norm'" in capsys.readouterr().err
    out = store_env.parent / "board.html"
    assert main(["leaderboard", "--store", str(store_env), "--format", "html", "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and "wrote" in capsys.readouterr().err


def test_show_prints_one_json_document_with_scores(store_env, capsys):
    assert main(["show", "--store", str(store_env), "-m", "ties"]) == 0
    cells = json.loads(capsys.readouterr().out)
    assert len(cells) == 4 and all(c["method"] == "ties" for c in cells)
    assert cells[0]["scores"] == {"a": 0.80, "b": 0.70} and cells[0]["metrics"]["a"]["loss"] == pytest.approx(0.2)
    assert {"cell_key", "params", "seed", "merge_seconds", "versions", "extras"} <= set(cells[0])


def test_show_failed_with_nothing_failed_says_so(store_env, capsys):
    assert main(["show", "--store", str(store_env), "--failed"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [] and f"no failed cells in {store_env}" in captured.err
    store = ResultStore(store_env)
    store.put(cell("boom", {"x": 1}, status="failed", error="RuntimeError: no", traceback="Traceback\n  line\n"))
    store.close()
    assert main(["show", "--store", str(store_env), "--failed"]) == 0
    (failed,) = json.loads(capsys.readouterr().out)
    assert failed["error"] == "RuntimeError: no" and failed["traceback"] == ["Traceback", "  line"]


def test_a_real_run_names_its_parameters_in_every_format(cli_env, capsys):
    """The issue's example: `ties.k=0.1 --seed 0,1` printed as `ties (seed=0)`."""
    assert main(["run", "-m", "ties", "-p", "digits-mlp_TA8", "ties.k=0.1", "--seed", "0,1"]) == 0
    table = body_rows(capsys.readouterr().out)
    assert table["ties (k=0.1)"][0] == "2" and "ties (seed=0)" not in table
    for fmt, needle in (("github", "| ties (k=0.1) "), ("latex", "ties (k=0.1) & 2 &"),
                        ("html", '<span class="set">(k=0.1)</span>'), ("csv", ',ties,ties (k=0.1),0,'),
                        ("json", '"label": "ties (k=0.1)"')):
        assert main(["leaderboard", "--format", fmt]) == 0
        out = capsys.readouterr().out
        assert needle in out, fmt
        assert ("±" in out or "\\pm" in out or '"std"' in out or "_std" in out), fmt
