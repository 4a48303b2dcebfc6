"""`mergebench leaderboard` options that choose rows and marks (`-m`, `--mark-costs`, `--latex-float`, `--pareto
-m`), and the headers of `mergebench list`, through `cli.main` on a store with known rows."""

import pytest

from mergebench_core.cli import main
from mergebench_core.results.store import CellResult, ResultStore


def cell(method, a, b, kind="method", params=None, preference=None, merge=0.5, mem=100.0, evals=1.0):
    return CellResult(kind=kind, method=method, params=params if params is not None else {}, modelpool="mp",
                      taskpool="tp", seed=0, preference=preference,
                      metrics={"a": {"accuracy": a}, "b": {"accuracy": b}}, mean=(a + b) / 2,
                      normalized_mean=(a / 0.9 + b / 0.9) / 2, merge_seconds=merge, peak_memory_mb=mem,
                      eval_seconds=evals, versions={"mergebench": "0.1.0"})


ROWS = [cell("pretrained", 0.5, 0.4, kind="reference", params={}),
        cell("individual", 0.9, 0.9, kind="reference", params={}),
        cell("ties", 0.80, 0.70, merge=0.40, mem=50.0, evals=3.0),
        cell("ta", 0.70, 0.60, merge=0.10, mem=90.0, evals=1.0),
        cell("tsv", 0.75, 0.65, merge=0.90, mem=20.0, evals=2.0),
        # preference fronts for --pareto: three points each
        *[cell("pa_ta", a, b, preference=p) for a, b, p in ((0.9, 0.5, [1.0, 0.0]), (0.7, 0.7, [0.5, 0.5]),
                                                           (0.6, 0.6, [0.0, 1.0]))],
        *[cell("pa_ties", a, b, preference=p) for a, b, p in ((0.85, 0.5, [1.0, 0.0]), (0.65, 0.65, [0.5, 0.5]),
                                                             (0.5, 0.8, [0.0, 1.0]))]]


@pytest.fixture()
def store(tmp_path, monkeypatch):
    path = tmp_path / "results.sqlite"
    monkeypatch.chdir(tmp_path)
    s = ResultStore(path)
    for i, c in enumerate(ROWS):
        c.created_at = 1000.0 + i
        s.put(c)
    s.close()
    return str(path)


def board(capsys, store, *options):
    assert main(["leaderboard", "--store", store, *options]) == 0
    return capsys.readouterr().out


def labels(text):
    return [line.strip("|").split("|")[0].strip() for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|--")][1:]


def test_method_option_keeps_the_chosen_methods_beside_the_references(store, capsys):
    assert set(labels(board(capsys, store))) >= {"ties", "ta", "tsv"}
    chosen = labels(board(capsys, store, "-m", "ties", "--method", "TSV"))  # repeatable, any spelling
    assert chosen[:2] == ["Pretrained", "Individual (experts)"] and sorted(chosen[2:]) == ["ties", "tsv"]
    assert sorted(labels(board(capsys, store, "-m", "ta,tsv"))[2:]) == ["ta", "tsv"]
    assert main(["leaderboard", "--store", store, "-m", "tiess"]) == 2
    assert "no stored results for method(s) tiess (did you mean pa_ties, ties?)" in capsys.readouterr().err


def test_pareto_with_methods_lists_only_their_fronts_against_the_pretrained_model(store, capsys):
    every = board(capsys, store, "--pareto")
    assert "pa_ta" in every and "pa_ties" in every
    only = board(capsys, store, "--pareto", "-m", "pa_ties")
    assert "pa_ties" in only and "pa_ta " not in only and "| ties" not in only
    assert "(reference: pretrained model)" in only  # the reference rows stayed
    assert main(["leaderboard", "--store", store, "--pareto", "-m", "pa_tie"]) == 2
    assert "(did you mean pa_ta, pa_ties?)" in capsys.readouterr().err


def test_mark_costs_marks_the_smallest_merge_time_memory_and_eval_time(store, capsys):
    options = ("-m", "ties,ta,tsv", "--columns=avg,merge,mem,eval", "--format", "latex")

    def rows(text):
        return {line.split(" & ")[0]: line.rstrip(" \\\\").split(" & ")[1:] for line in text.splitlines()
                if line.startswith(("ties &", "ta &", "tsv &"))}

    plain = rows(board(capsys, store, *options))
    assert plain == {"ties": [r"\textbf{75.0}", "0.40", "50", "3.00"],  # scores only
                     "tsv": [r"\underline{70.0}", "0.90", "20", "2.00"],
                     "ta": ["65.0", "0.10", "90", "1.00"]}
    marked = rows(board(capsys, store, *options, "--mark-costs"))  # smallest first: bold, then underlined
    assert marked == {"ties": [r"\textbf{75.0}", r"\underline{0.40}", r"\underline{50}", "3.00"],
                      "tsv": [r"\underline{70.0}", "0.90", r"\textbf{20}", r"\underline{2.00}"],
                      "ta": ["65.0", r"\textbf{0.10}", "90", r"\textbf{1.00}"]}


def test_latex_float_puts_the_table_in_one_column_on_request(store, capsys):
    default = board(capsys, store, "--format", "latex")
    assert r"\begin{table*}" in default and r"\end{table*}" in default
    single = board(capsys, store, "--format", "latex", "--latex-float", "table")
    assert r"\begin{table}" in single and "table*" not in single
    with pytest.raises(SystemExit) as exit_:
        main(["leaderboard", "--store", store, "--format", "latex", "--latex-float", "figure"])
    assert exit_.value.code == 2 and "invalid choice: 'figure'" in capsys.readouterr().err


def test_list_names_every_column_of_the_methods_table(capsys):
    main(["list"])
    lines = capsys.readouterr().out.splitlines()
    header = lines[lines.index("Methods:") + 1].split()
    assert header == ["name", "provided", "by", "kind", "description"]
    pools = lines[lines.index("Model pools:") + 1].split()
    assert pools == ["name", "provided", "by", "default", "description"]
