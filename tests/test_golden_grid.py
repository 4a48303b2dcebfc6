"""Every stored cell of the default and fusion grids on the embedded pools against the golden file.

On any machine a changed cell key, status, parameter or error fails here and names the cells, and so does an accuracy
that moves further than another CPU explains (`tools/golden_grid.py`, `PORTABLE_ABS_TOL`). Bit-for-bit comparison is
`python tools/golden_grid.py --exact` on the machine that wrote the file. A change that is meant to change numbers
regenerates the file (`python tools/golden_grid.py --write`) and says why.
"""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _golden_module():
    spec = importlib.util.spec_from_file_location("golden_grid", ROOT / "tools" / "golden_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_and_fusion_grids_store_the_golden_numbers(tmp_path):
    golden = _golden_module()
    _, expected = golden.load()
    actual = golden.run_grids(tmp_path)
    assert golden.differences(expected, actual) == []
    assert len(actual) >= len(expected) > 0


def test_the_comparison_names_a_changed_bit():
    golden = _golden_module()
    cell = {"method": "ties", "modelpool": "p", "mean": (0.5).hex()}
    flipped = {**cell, "mean": (0.5 + 2**-52).hex()}
    assert golden.differences({"k": cell}, {"k": flipped}, exact=True) == ["changed k: ties on p: mean"]
    assert golden.differences({"k": cell}, {"k": flipped}) == []
    assert golden.differences({"k": cell}, {}) == ["missing k: ties on p"]


def test_a_new_cell_of_a_known_method_is_a_difference_and_a_new_method_is_not():
    golden = _golden_module()
    cell = {"method": "ties", "modelpool": "p", "mean": (0.5).hex()}
    other = {**cell, "modelpool": "q"}
    assert golden.differences({"k": cell}, {"k": cell, "j": other}) == ["new j: ties on q"]
    assert golden.differences({"k": cell}, {"k": cell, "j": {**other, "method": "brand_new"}}) == []


def test_portable_comparison_allows_float_drift_but_not_a_real_change():
    golden = _golden_module()

    def cell(accuracy, loss=0.25, examples=597.0, status="ok", k=0.1):
        return {"method": "ties", "modelpool": "p", "status": status, "params": {"k": k},
                "mean": accuracy.hex(), "normalized_mean": None,
                "metrics": {"digits": {"accuracy": accuracy.hex(), "loss": loss.hex(), "examples": examples.hex()}}}

    base = cell(0.80)
    assert golden.differences({"k": base}, {"k": cell(0.80 + 0.03, loss=0.4)}) == []
    assert golden.differences({"k": base}, {"k": cell(0.80 + 0.06)}) == ["changed k: ties on p: mean, metrics"]
    assert golden.differences({"k": base}, {"k": cell(0.80, examples=596.0)}) == ["changed k: ties on p: metrics"]
    assert golden.differences({"k": base}, {"k": cell(0.80, status="failed")}) == ["changed k: ties on p: status"]
    assert golden.differences({"k": base}, {"k": cell(0.80, k=0.2)}) == ["changed k: ties on p: params"]
    assert golden.differences({"k": base}, {"k": cell(0.80 + 0.03)}, exact=True) == [
        "changed k: ties on p: mean, metrics"]


def test_the_file_says_which_machine_wrote_it():
    golden = _golden_module()
    recorded_on, cells = golden.load()
    assert {"torch", "cpu_capability", "machine"} <= recorded_on.keys()
    assert len(cells) > 100


def test_alignment_by_search_gets_the_wider_tolerance():
    golden = _golden_module()

    def cell(method, accuracy):
        return {"method": method, "modelpool": "p_seeds", "status": "ok", "params": {}, "mean": accuracy.hex(),
                "normalized_mean": None, "metrics": {"digits": {"accuracy": accuracy.hex()}}}

    assert golden.differences({"k": cell("git_rebasin", 0.90)}, {"k": cell("git_rebasin", 0.83)}) == []
    assert golden.differences({"k": cell("git_rebasin", 0.90)}, {"k": cell("git_rebasin", 0.78)}) != []
    assert golden.differences({"k": cell("slerp", 0.90)}, {"k": cell("slerp", 0.83)}) != []
