"""Leaderboard tables: rows that name their configuration, seeds as mean ± std with n, columns, and each format."""

import ast
import csv
import importlib.util
import io
import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

import mergebench_core
from mergebench_core.cli import main
from mergebench_core.errors import MergebenchError
from mergebench_core.results.latex import SHRINK_TO_LINE
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
    assert spec == r"\begin{tabular}{lrrrr}"  # label, n, each number right-aligned in one column
    refs_end = lines.index(next(l for l in lines if l.startswith("Individual (experts)")))
    assert lines[refs_end + 1] == r"\midrule"  # a rule after the reference rows
    body = latex_rows(text)
    assert body[0] == "Method & $n$ & a & b & Avg. \\\\"
    best = next(i for i, l in enumerate(lines) if l.startswith("ties (k=0.1)"))
    assert lines[best].startswith(r"ties (k=0.1) & 3 & \textbf{82.0} & \textbf{72.0} & \textbf{77.0}")
    # the seeds' std in small type on the line below the means, in the same columns
    assert lines[best + 1] == r" &  & {\scriptsize$\pm$2.0} & {\scriptsize$\pm$2.0} & {\scriptsize$\pm$1.7} \\[1pt]"
    second = next(l for l in body if l.startswith(r"tall\_masks$^\dagger$"))
    assert r"\underline{75.0}" in second
    assert r"\textbf" not in next(l for l in body if l.startswith("Individual"))  # references are not ranked
    assert r"$^\dagger$\,One model per task" in text  # the dagger explained below the table
    assert "mean over $n$ seeds, with the sample standard deviation ($\\pm$) below" in text


def _pdflatex():
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        if os.environ.get("CI"):
            pytest.fail("pdflatex is missing: .ci/run installs texlive-latex-recommended")
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-recommended)")
    return pdflatex


def compile_latex(folder, table, documentclass="{article}", before=""):
    """Compile `table` in a document of that class (booktabs, graphicx); the log's text."""
    (folder / "table.tex").write_text(table)
    (folder / "doc.tex").write_text(f"\\documentclass{documentclass}\n\\usepackage{{booktabs}}\n"
                                    "\\usepackage{graphicx}\n\\begin{document}\n" + before +
                                    "\\input{table.tex}\n\\end{document}\n")
    proc = subprocess.run([_pdflatex(), "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], check=False,
                          cwd=folder, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (folder / "doc.pdf").read_bytes().startswith(b"%PDF")
    return (folder / "doc.log").read_text(errors="replace")


def test_latex_escapes_and_compiles(tmp_path):
    rows = [*SEEDED, cell("tall_masks", {"t_x": "a&b%"}, task_specific=True, status="ok"),
            cell("boom", {"x": 1}, status="failed", error="RuntimeError: 50% & more")]
    text = render(rows, "latex", defaults=lambda m: {} if m == "tall_masks" else defaults(m))
    assert r"t\_x=a\&b\%" in text and "% FAILED boom" in text
    assert "Undefined control sequence" not in compile_latex(tmp_path, text)


def board():
    """Realistic rows: the README's eight-task grid on the embedded pool (references, 13 configurations, one over
    three seeds, one task-specific, one failed), and a two-task pool run at five preferences."""
    data = json.loads((Path(__file__).parent / "data" / "results_board.json").read_text())
    return [CellResult(**d) for d in data]


@pytest.mark.parametrize("float_env", ["table*", "table"])
def test_latex_eight_task_table_fits_a_two_column_paper(tmp_path, float_env):
    """The issue's table: eight tasks, Avg., Norm., Merge (s), Peak mem, a row over three seeds and long labels was
    298 pt wider than a page. It now fits a two-column paper (no overfull line), in both columns (`table*`) or in
    one (`table`), and is compact enough that spanning both columns shrinks it by at most a quarter."""
    cells = [c for c in board() if c.modelpool == "digits-mlp_TA8"]
    text = render(cells, "latex", latex_float=float_env)
    assert text.count(r"\midrule") == 2 and "transpose & parity & magnitude & Avg. & Norm." in text
    filler = "Merging combines experts without retraining them. " * 40 + "\n\n"
    log = compile_latex(tmp_path, text, "[twocolumn]{article}", filler)
    assert "Overfull \\hbox" not in log, log[log.find("Overfull"):][:300]
    if float_env == "table*":  # the same table, unscaled, measured: at most 4/3 of the text width (469 pt)
        natural = text.replace(SHRINK_TO_LINE, r"\setbox0\hbox{%").replace(
            r"\end{tabular}}", r"\end{tabular}}\typeout{NATURAL=\the\wd0}\typeout{TEXT=\the\textwidth}")
        measured = compile_latex(tmp_path, natural, "[twocolumn]{article}")
        width = float(re.search(r"NATURAL=([0-9.]+)pt", measured).group(1))
        text_width = float(re.search(r"TEXT=([0-9.]+)pt", measured).group(1))
        assert text_width < width <= text_width * 4 / 3, (width, text_width)


def test_latex_float_is_checked():
    with pytest.raises(ValueError, match="unknown LaTeX float 'figure'"):
        render(SEEDED, "latex", latex_float="figure")


# --- which rows, which marks ---------------------------------------------------------------------------------------
def test_method_filter_keeps_references_and_the_chosen_methods():
    rows = [*SEEDED, cell("ta", {"scaling_factor": 0.4}), cell("boom", {"x": 1}, status="failed", error="no"),
            CellResult("method", "ties", TIES_DEFAULTS, "other", "tp", metrics={"a": {"accuracy": 0.5}})]
    text = render(rows, methods=["ta"], defaults=defaults)
    assert list(body_rows(text)) == ["Method", "Pretrained", "Individual (experts)", "ta (scaling_factor=0.4)"]
    assert "FAILED" not in text and "other" not in text  # another method's failure; a pool without `ta`: left out
    table, other = build_tables(rows, methods="Ties,boom", defaults=defaults)  # any spelling, commas
    assert {r.method for r in table.methods} == {"ties"} and [c.method for c in table.failed] == ["boom"]
    assert other.modelpool == "other" and [r.method for r in other.rows] == ["ties"]
    with pytest.raises(MergebenchError, match=r"no stored results for method\(s\) tiess \(did you mean ties\?\); "
                                              r"the store has boom, ta, ties"):
        render(rows, methods="tiess")


def test_only_score_columns_are_marked_unless_asked_and_ties_are_marked_alike():
    rows = [*references(),
            cell("x", a=0.80, b=0.60, merge_seconds=0.30, peak_memory_mb=3.0),
            cell("y", a=0.80, b=0.70, merge_seconds=0.10, peak_memory_mb=3.2),  # a: tied best with x
            cell("z", a=0.70, b=0.65, merge_seconds=0.20, peak_memory_mb=2.6),  # mem shows 3 MB: tied with x, y
            cell("w", a=0.60, b=0.50, merge_seconds=0.40, peak_memory_mb=9.0)]
    (table,) = build_tables(rows, defaults=lambda m: {})
    col = {c.id: c for c in table.columns}

    def marks(column, tb=table):
        return {r.method: tb.marks(column).get(id(r)) for r in tb.methods}

    assert marks(col["a"]) == {"x": 1, "y": 1, "z": None, "w": None}  # both tied best bold; z is third: no mark
    assert marks(col["b"]) == {"y": 1, "z": 2, "x": None, "w": None}
    assert marks(col["merge"]) == marks(col["mem"]) == {"x": None, "y": None, "z": None, "w": None}
    (asked,) = build_tables(rows, defaults=lambda m: {}, mark_costs=True)
    assert marks(col["merge"], asked) == {"y": 1, "z": 2, "x": None, "w": None}  # smallest first
    assert marks(col["mem"], asked) == {"x": 1, "y": 1, "z": 1, "w": None}  # 3, 3, 3 MB as shown: all bold
    latex = render(rows, "latex", defaults=lambda m: {})
    assert latex.count(r"\textbf{3}") == 0 and latex.count(r"\textbf{80.0}") == 2
    assert render(rows, "latex", defaults=lambda m: {}, mark_costs=True).count(r"\textbf{3}") == 3
    html = render(rows, "html", defaults=lambda m: {})
    assert html.count('class="num best"') == 2 + 1 + 1 + 1 and html.count('class="num second"') == 3


# --- the results room ----------------------------------------------------------------------------------------------
ROOM = Path(mergebench_core.__file__).parent / "results"


def _imports(path):
    """The mergebench_core modules a file imports, at any depth (a lazy import is an arrow too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mergebench_core"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.add(sub if importlib.util.find_spec(node.module) and _is_module(sub) else node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("mergebench_core"))
    return names


def _is_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_results_modules_are_small_acyclic_and_use_no_private_names():
    modules = {f"mergebench_core.results.{p.stem}": p for p in ROOM.glob("*.py") if p.stem != "__init__"}
    for name, path in modules.items():
        assert len(path.read_text().splitlines()) <= 500, name
        tree = ast.parse(path.read_text())
        private = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and (node.module or "").startswith("mergebench_core") for a in node.names
                   if a.name.startswith("_") and a.name != "__version__"]
        assert private == [], (name, private)
        assert "mergebench_core.results" not in _imports(path), name  # never the room's own __init__ face
    graph = {name: _imports(path) & set(modules) for name, path in modules.items()}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    assert [m for m in modules if reaches(m, m)] == []


def test_public_names_still_import_from_the_leaderboard_module_and_its_old_path():
    from mergebench_core.leaderboard import render as old_render  # the flat layout's path
    from mergebench_core.results import leaderboard

    assert old_render is render
    for name in ("Column", "Row", "Stat", "Table", "build_tables", "choose_columns", "column_names",
                 "installed_defaults", "latex_escape", "metric_title", "reference_label", "preference_label", "row_json", "short_value",
                 "table_body", "task_order", "group", "FORMATS", "SUMMARY_COLUMNS", "TASK_SPECIFIC_MARK"):
        assert hasattr(leaderboard, name), name


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
