"""`mergebench plot pareto`: files in the asked format, with each method's front and the reference markers."""

import pytest

from mergebench_core.errors import MergebenchError
from mergebench_core.plots import pareto_figure
from mergebench_core.store import CellResult

pytest.importorskip("matplotlib")


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
