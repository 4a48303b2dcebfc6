"""What the digits pools share (`mergebench_digits_tasks`), and that they share it without importing each other."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from mergebench_digits_tasks import TASKS, DataSplit, DigitsData, calibrated_scale

from mergebench_core import PRETRAINED


def test_the_calibrated_scale_is_the_cross_entropy_minimum():
    # every example has cosine +0.5 with class 0 and -0.5 with class 1; three in four are class 0. The mean loss
    # 3/4 log(1 + e^-s) + 1/4 log(1 + e^s) is smallest where sigmoid(s) = 3/4, at s = ln 3.
    cosines = torch.tensor([[0.5, -0.5]] * 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    assert calibrated_scale({"t": cosines}, {"t": labels}) == pytest.approx(math.log(3.0), rel=1e-6)
    # in float32 the loss is flat to its rounding within about 1e-3 of the minimum
    assert calibrated_scale({"t": cosines.float()}, {"t": labels}) == pytest.approx(math.log(3.0), rel=2e-3)
    # tasks are summed: a second task whose optimum is ln 9 (nine in ten) moves the shared scale between the two
    other = torch.tensor([[0.5, -0.5]] * 10, dtype=torch.float64), torch.tensor([0] * 9 + [1])
    both = calibrated_scale({"t": cosines, "u": other[0]}, {"t": labels, "u": other[1]})
    assert math.log(3.0) < both < math.log(9.0)


def test_the_split_is_the_embedded_pools():
    data = DigitsData(DataSplit())
    x, y = data.split("rot90", "train")
    assert x.shape == (1200, 64) and len(data.split("digits", "test")[1]) == 597
    assert data.num_classes("parity") == 2 and len(TASKS) == 8
    with pytest.raises(KeyError, match="unknown digits task 'rot45'"):
        data.split("rot45", "test")


@pytest.mark.parametrize("module, must_not_import", [
    ("mergebench_digits_seeds", "mergebench_digits"),
    ("mergebench_digits_tasks", "mergebench_digits"),
    ("mergebench_digits", "mergebench_digits_seeds"),
])
def test_the_digits_modules_do_not_import_each_other(module, must_not_import):
    """`mergebench_digits` registers the independent pools from inside its hooks; nothing imports it back."""
    code = f"import sys, {module}\nprint({must_not_import!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_the_embedded_pool_reads_through_the_folder_base(tmp_path):
    from mergebench_digits import DigitsModelPool, Encoder, Recipe

    pool = DigitsModelPool(Recipe(hidden=8, features=4, pretrain_steps=1, finetune_steps=1, tasks=("digits",)),
                           tmp_path)
    model = pool.build_model()
    assert isinstance(model, Encoder) and model.fc1.out_features == 8 and "folder" not in vars(pool)  # not built
    with pytest.raises(KeyError, match=r"has no model 'rot90'; models: _pretrained_, digits"):
        pool.state_dict("rot90")
    assert "folder" not in vars(pool)  # an unknown name is refused before anything is built
    expert = pool.load_model("digits")
    assert torch.equal(expert.fc3.weight, pool.state_dict("digits")["fc3.weight"])
    assert not torch.equal(expert.fc3.weight, pool.state_dict(PRETRAINED)["fc3.weight"])
