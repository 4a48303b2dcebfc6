"""Every stored number of the default and fusion grids on the embedded pools, bit for bit, against the golden file.

A refactoring that changes a single cell key or a single bit of a stored metric fails here and names the cells.
A change that is meant to change numbers regenerates the file (`python tools/golden_grid.py --write`) and says why.
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
    expected = json.loads(golden.GOLDEN.read_text())
    actual = golden.run_grids(tmp_path)
    assert golden.differences(expected, actual) == []
    assert len(actual) >= len(expected) > 0


def test_the_comparison_names_a_changed_bit():
    golden = _golden_module()
    cell = {"method": "ties", "modelpool": "p", "mean": (0.5).hex()}
    flipped = {**cell, "mean": (0.5 + 2**-52).hex()}
    assert golden.differences({"k": cell}, {"k": flipped}) == ["changed k: ties on p: mean"]
    assert golden.differences({"k": cell}, {}) == ["missing k: ties on p"]


def test_a_new_cell_of_a_known_method_is_a_difference_and_a_new_method_is_not():
    golden = _golden_module()
    cell = {"method": "ties", "modelpool": "p", "mean": (0.5).hex()}
    other = {**cell, "modelpool": "q"}
    assert golden.differences({"k": cell}, {"k": cell, "j": other}) == ["new j: ties on q"]
    assert golden.differences({"k": cell}, {"k": cell, "j": {**other, "method": "brand_new"}}) == []
