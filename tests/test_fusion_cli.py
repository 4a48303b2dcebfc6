"""Fusion from the command line: your own models from a folder, pool seeds as cell seeds, and bad input (mismatched
architectures, a missing permutation spec, too few samples for least squares) refused with what to change."""

from __future__ import annotations

import textwrap

import torch
import torch.nn.functional as F
from mergebench_digits_seeds import DigitsFullTaskPool

from mergebench_core.cli import main
from mergebench_core.pools.folder import FOLDER_ENV, CheckpointFolderPool
from mergebench_core.results.store import ResultStore
from mergebench_core.engine.tensors import save_state_dict

MODEL_PY = '''
import torch.nn.functional as F
from torch import nn

from mergebench_core.fusion.alignment import Level, PermutationSpec, mlp_permutation_spec

TASKPOOL = "digits_full"


class Net(nn.Module):
    def __init__(self, hidden={hidden}):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def build_model():
    return Net()
'''

SPEC_PY = '''

def permutation_spec():
    axes = mlp_permutation_spec(["fc1", "fc2"]).axes
    return PermutationSpec(axes, points={"P_fc1": "fc1"}, levels=[Level("fc1"), Level("fc2")])
'''


def write_folder(folder, *, hidden=32, spec=True, widths=(32, 32)):
    """model.py and one briefly trained checkpoint per width (each from its own seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(textwrap.dedent(MODEL_PY.format(hidden=hidden)) + (SPEC_PY if spec else ""))
    x, y = DigitsFullTaskPool().data.split("digits", "train")
    for i, width in enumerate(widths):
        torch.manual_seed(i)
        fc1, fc2 = torch.nn.Linear(64, width), torch.nn.Linear(width, 10)
        opt = torch.optim.Adam([*fc1.parameters(), *fc2.parameters()], lr=1e-2)
        for step in range(150):
            idx = torch.arange(step * 64, step * 64 + 64) % len(x)
            loss = F.cross_entropy(fc2(F.relu(fc1(x[idx]))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_state_dict({"fc1.weight": fc1.weight, "fc1.bias": fc1.bias, "fc2.weight": fc2.weight,
                         "fc2.bias": fc2.bias}, folder / f"net{i}.safetensors")
    return folder


def test_a_folder_of_your_own_models_is_fused_from_the_command_line(cli_env, monkeypatch, capsys):
    folder = write_folder(cli_env / "mine")
    pool = CheckpointFolderPool(folder)
    assert pool.expert_names == ["net0", "net1"] and pool.default_taskpool == "digits_full"
    assert pool.permutation_spec().sizes(pool.state_dict("net0")) == {"P_fc1": 32}
    monkeypatch.setenv(FOLDER_ENV, str(folder))
    assert main(["run", "-p", "fusion-folder", "-m", "git_rebasin,hf_fusion,kf_fusion,simple_average",
                 "git_rebasin.matching=activation"]) == 0
    rows = {r.method: r for r in ResultStore(cli_env / "results.sqlite").all()}
    assert {"model net0", "model net1", "best model", "git_rebasin", "hf_fusion", "kf_fusion"} <= set(rows)
    assert all(rows[m].status == "ok" for m in rows)
    assert rows["hf_fusion"].mean > rows["simple_average"].mean
    assert "fusion-folder" in capsys.readouterr().out


def test_bad_folders_are_refused_before_any_work_with_what_to_change(cli_env, monkeypatch, capsys):
    monkeypatch.delenv(FOLDER_ENV, raising=False)
    assert main(["run", "-p", "fusion-folder", "-m", "git_rebasin"]) == 2
    assert f"set it, e.g. {FOLDER_ENV}=" in capsys.readouterr().err

    mixed = write_folder(cli_env / "mixed", widths=(32, 48))
    monkeypatch.setenv(FOLDER_ENV, str(mixed))
    assert main(["run", "-p", "fusion-folder", "-m", "git_rebasin"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint net1.safetensors does not fit model.py's build_model(): fc1.weight is (48, 64)" in err

    pickles = cli_env / "pickles"
    pickles.mkdir()
    (pickles / "model.py").write_text(textwrap.dedent(MODEL_PY.format(hidden=8)))
    torch.save({"w": torch.zeros(1)}, pickles / "a.pt")
    monkeypatch.setenv(FOLDER_ENV, str(pickles))
    assert main(["run", "-p", "fusion-folder", "-m", "git_rebasin"]) == 2
    err = capsys.readouterr().err
    assert "a.pt are pickles, never read: convert each once with `mergebench convert" in err

    (pickles / "model.py").unlink()
    assert main(["run", "-p", "fusion-folder", "-m", "git_rebasin"]) == 2
    assert "needs a model.py defining build_model()" in capsys.readouterr().err
    assert not (cli_env / "results.sqlite").exists()


def test_a_missing_permutation_spec_refuses_every_fusion_method(cli_env, monkeypatch, capsys):
    monkeypatch.setenv(FOLDER_ENV, str(write_folder(cli_env / "nospec", spec=False)))
    for method in ("git_rebasin", "otfusion", "hf_fusion", "kf_fusion", "alf"):
        assert main(["run", "-p", "fusion-folder", "-m", method]) == 2
        err = capsys.readouterr().err
        assert f"{method} on fusion-folder" in err and "declares no permutation spec" in err
    assert main(["run", "-p", "fusion-folder", "-m", "simple_average,ensemble"]) == 0  # no alignment needed


def test_closed_form_fusion_on_a_vit_and_too_few_samples_say_what_to_change(cli_env, capsys):
    assert main(["run", "-p", "digits-vit_seeds", "-m", "hf_fusion"]) == 2
    err = capsys.readouterr().err
    assert "each level must be one nn.Linear or nn.Conv2d" in err and "use alf" in err

    assert main(["run", "-p", "digits-mlp_seeds", "-m", "hf_fusion", "hf_fusion.num_fusion_samples=100"]) == 1
    (row,) = [r for r in ResultStore(cli_env / "results.sqlite").all() if r.method == "hf_fusion"]
    assert row.status == "failed"
    assert "level 'fc2' has 100 rows of inputs for 129 unknowns" in row.error
    assert "raise num_fusion_samples from 100 to at least 129" in row.error


def test_cell_seeds_fuse_the_base_models_of_that_pool_seed(cli_env):
    assert main(["run", "-p", "digits-mlp_seeds", "-m", "git_rebasin", "--seed", "0,1"]) == 0
    rows = ResultStore(cli_env / "results.sqlite").all()
    models = {(r.method, r.seed): r for r in rows if r.kind == "reference"}
    assert {s for _, s in models} == {0, 1}
    assert models[("model seed0", 0)].mean != models[("model seed0", 1)].mean  # other initialisations
    fused = {r.seed: r for r in rows if r.method == "git_rebasin"}
    assert fused[0].versions["digits_seeds_pool_seed"] == "0" and fused[1].versions["digits_seeds_pool_seed"] == "1"
    assert fused[0].versions["digits_seeds_recipe"] != fused[1].versions["digits_seeds_recipe"]
