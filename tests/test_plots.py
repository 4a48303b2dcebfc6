"""`mergebench plot`: files in the asked format; Pareto fronts with the reference markers, per-task bars, score
against merge time, and parameter sweeps with seed error bars."""

import json
import logging
from pathlib import Path

import pytest

from mergebench_core.cli import main
from mergebench_core.errors import MergebenchError
from mergebench_core.results import plots
from mergebench_core.results.plots import pareto_figure, sweep_figure, tasks_figure, time_figure
from mergebench_core.results.store import CellResult, ResultStore

pytest.importorskip("matplotlib")
from matplotlib.colors import to_rgba  # noqa: E402  (after the skip: matplotlib is optional)
from matplotlib.container import BarContainer  # noqa: E402


def cell(method, preference, a, b, kind="method"):
    return CellResult(kind, method, {}, "pool[a,b]", "tasks[a,b]", preference=preference,
                      metrics={"a": {"accuracy": a}, "b": {"accuracy": b}})


RESULTS = [
    cell("pretrained", None, 0.5, 0.5, kind="reference"),
    cell("individual", None, 0.9, 0.9, kind="reference"),
    cell("pa_x", [1.0, 0.0], 0.8, 0.55), cell("pa_x", [0.5, 0.5], 0.7, 0.7), cell("pa_x", [0.0, 1.0], 0.55, 0.8),
    cell("pa_y", [1.0, 0.0], 0.75, 0.5), cell("pa_y", [0.0, 1.0], 0.6, 0.6),
]


def test_svg_holds_each_method_and_the_markers(tmp_path):
    [path] = pareto_figure(RESULTS, tmp_path / "fronts.svg")
    text = path.read_text()
    assert path == tmp_path / "fronts.svg" and text.lstrip().startswith("<?xml")
    for label in ("pa_x", "pa_y", "pretrained", "experts (ideal)", "a (%)", "b (%)"):
        assert label in text


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF")])
def test_png_and_pdf(tmp_path, suffix, magic):
    [path] = pareto_figure(RESULTS, tmp_path / f"fronts{suffix}")
    assert path.read_bytes().startswith(magic)


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(MergebenchError, match=".png, .svg or .pdf"):
        pareto_figure(RESULTS, tmp_path / "fronts.jpg")
    one_task = [CellResult("method", "m", {}, "p", "t", metrics={"a": {"accuracy": 0.5}})]
    with pytest.raises(MergebenchError, match="two or more tasks"):
        pareto_figure(one_task, tmp_path / "fronts.png")


# --- per-task bars, score against merge time, parameter sweeps ---------------------------------------------------
def scored(method, params, seed, a, b, merge_seconds=0.1, kind="method"):
    return CellResult(kind, method, dict(params), "mp", "tp", seed=seed, metrics={"a": {"accuracy": a},
                      "b": {"accuracy": b}}, mean=(a + b) / 2, normalized_mean=(a + b) / 1.8,
                      merge_seconds=merge_seconds)


GRID = [scored("pretrained", {}, 0, 0.5, 0.4, None, kind="reference"),
        scored("individual", {}, 0, 0.9, 0.9, None, kind="reference")]
for lam in (0.1, 0.3, 0.5):
    for seed in (0, 1, 2):
        GRID.append(scored("dare_x", {"lam": lam, "p": 0.5}, seed, 0.6 + lam / 2 + seed / 100, 0.6 - lam / 4, 0.2))
    GRID.append(scored("ta_x", {"lam": lam}, 0, 0.55 + lam / 4, 0.6, 0.01))
GRID.append(scored("dare_x", {"lam": 0.3, "p": 0.9}, 0, 0.5, 0.5, 0.2))


def test_task_bars_for_chosen_methods(tmp_path):
    [path] = tasks_figure(GRID, tmp_path / "tasks.svg", methods=["ta-x"])
    text = path.read_text()
    assert "ta_x (lam=0.1)" in text and "Pretrained" in text and "Individual (experts)" in text
    assert "dare_x" not in text and "Avg." in text
    with pytest.raises(MergebenchError, match="no stored results for method.*nope"):
        tasks_figure(GRID, tmp_path / "tasks.svg", methods=["nope"])


def test_score_against_merge_time(tmp_path):
    [path] = time_figure(GRID, tmp_path / "time.svg", score="a")
    text = path.read_text()
    assert "merge time (s)" in text and "a: accuracy" in text
    assert "dare_x (lam=0.5, p=0.5)" in text and "ta_x (lam=0.3)" in text
    with pytest.raises(MergebenchError, match="use avg, norm or one of the tasks"):
        time_figure(GRID, tmp_path / "time.svg", score="c")


def test_sweep_is_a_line_per_setting_with_seed_error_bars(tmp_path):
    [path] = sweep_figure(GRID, tmp_path / "sweep.svg", param="lam")
    text = path.read_text()
    assert "sweep over lam" in text and "dare_x (p=0.5), n=3" in text and "ta_x, n=1" in text
    assert "dare_x (p=0.9" not in text  # one value of lam only: no line
    with pytest.raises(MergebenchError, match=r"name the swept parameter with --param: several vary \(lam, p\)"):
        sweep_figure(GRID, tmp_path / "sweep.svg")
    with pytest.raises(MergebenchError, match="two or more values of 'q'"):
        sweep_figure(GRID, tmp_path / "sweep.svg", param="q")
    # with one method chosen, the parameter is found by itself; method.lam names it the way overrides do
    assert sweep_figure(GRID, tmp_path / "ta.pdf", methods=["ta_x"])[0].read_bytes().startswith(b"%PDF")
    assert sweep_figure(GRID, tmp_path / "ta.png", param="method.lam")[0].read_bytes().startswith(b"\x89PNG")


def test_plot_command(tmp_path, monkeypatch, capsys):
    store = ResultStore(tmp_path / "r.sqlite")
    for c in GRID:
        store.put(c)
    store.close()
    monkeypatch.chdir(tmp_path)
    for kind in ("tasks", "time", "sweep"):
        argv = ["plot", kind, "--store", str(tmp_path / "r.sqlite"), "-m", "dare_x"]
        assert main(argv + (["--param", "lam"] if kind == "sweep" else [])) == 0
        assert capsys.readouterr().out.strip() == f"wrote {kind}.png"
        assert (tmp_path / f"{kind}.png").read_bytes().startswith(b"\x89PNG")
    assert main(["plot", "sweep", "--store", str(tmp_path / "r.sqlite"), "--out", "s.jpg"]) == 2
    assert ".png, .svg or .pdf" in capsys.readouterr().err


# --- the figures, on realistic rows --------------------------------------------------------------------------
def board():
    """Realistic rows: the README's eight-task grid on the embedded pool, and a two-task pool run at preferences."""
    data = json.loads((Path(__file__).parent / "data" / "results_board.json").read_text())
    return [CellResult(**d) for d in data]


@pytest.fixture()
def figures(monkeypatch):
    """(figure, renderer) of every figure a plot function saves, drawn just before it is written."""
    drawn = []
    save = plots._save

    def keep(plt, fig, *args, **kwargs):
        fig.canvas.draw()
        drawn.append((fig, fig.canvas.get_renderer()))
        return save(plt, fig, *args, **kwargs)

    monkeypatch.setattr(plots, "_save", keep)
    return drawn


def _is_grey(color):
    r, g, b, _ = to_rgba(color)
    return abs(r - g) < 0.02 and abs(g - b) < 0.02


def test_pareto_title_is_whole_and_the_legend_hides_no_marker(tmp_path, figures):
    [path] = pareto_figure(board(), tmp_path / "fronts.png")
    ((fig, renderer),) = figures
    width = fig.bbox.width
    title = fig._suptitle.get_window_extent(renderer)
    assert 0 <= title.x0 and title.x1 <= width  # the long restricted pool names: cut at both ends before
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 >= ax.get_window_extent(renderer).x1 and legend.x1 <= width  # beside the axes, in the figure
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:4] == ["linear_scalarization", "epo", "pa_task_arithmetic", "pa_ties"]  # fronts, then points
    assert set(labels[4:]) == {"task_arithmetic", "ties", "simple_average", "tsv_m", "pretrained", "experts (ideal)"}
    assert path.read_bytes().startswith(b"\x89PNG")


def test_task_bars_of_methods_are_never_the_references_grey(tmp_path, figures):
    [path] = tasks_figure(board(), tmp_path / "tasks.png", modelpool="digits-mlp_TA8")
    ((fig, _),) = figures
    (ax,) = fig.axes
    colors = {c.get_label(): c.patches[0].get_facecolor() for c in ax.containers if isinstance(c, BarContainer)}
    assert len(colors) == 2 + 8  # the references and the eight best configurations
    assert _is_grey(colors["Pretrained"]) and _is_grey(colors["Individual (experts)"])
    methods = {k: v for k, v in colors.items() if k not in ("Pretrained", "Individual (experts)")}
    assert "dare_ta (p=0.9)" in methods  # the eighth: matplotlib's default cycle drew it grey
    assert not any(_is_grey(c) for c in methods.values()), methods
    assert len(set(methods.values())) == 8
    assert path == tmp_path / "tasks.png"  # one pool: exactly the name asked for


def test_several_pools_say_where_their_files_went(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mergebench_core.results.plots"):
        written = tasks_figure(board(), tmp_path / "tasks.png")
    assert [p.name for p in written] == ["tasks-digits-mlp_TA8.png", "tasks-digits-mlp_TA8_digits_rot90_.png"]
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.getMessage() == (
        "2 pools drawn, one file each (tasks-digits-mlp_TA8.png, tasks-digits-mlp_TA8_digits_rot90_.png); "
        "tasks.png itself was not written: choose one pool with --modelpool/--taskpool to get exactly that file")
    assert not (tmp_path / "tasks.png").exists()


def test_axis_says_accuracy_in_percent(tmp_path):
    [path] = sweep_figure(board(), tmp_path / "sweep.svg", methods=["task_arithmetic"], modelpool="digits-mlp_TA8")
    text = path.read_text()
    assert "average accuracy (%)" in text and "× 100" not in text
    [path] = time_figure(board(), tmp_path / "time.svg", score="norm", modelpool="digits-mlp_TA8")
    assert "normalized accuracy (%)" in path.read_text()
    lossy = [CellResult(**{**vars(c), "primary_metrics": {"digits": {"metric": "loss", "higher_is_better": False}}})
             for c in board() if c.modelpool == "digits-mlp_TA8"]
    [path] = sweep_figure(lossy, tmp_path / "loss.svg", methods=["task_arithmetic"])
    assert "average over tasks (× 100)" in path.read_text()  # not every task is scored by accuracy: no %
