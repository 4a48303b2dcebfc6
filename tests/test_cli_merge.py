"""`mergebench merge` on checkpoint files: same numbers as in memory, folders in and out, errors before output."""

import json

import torch

from mergebench_core.cli import main
from mergebench_core.merging import merge_sources
from mergebench_core.tensors import StateDictSource, load_state_dict, save_state_dict
from mergebench_ties import Params, Ties


def random_models(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # layer.0.weight is large enough (> 4 sample chunks) for TIES to settle its boundary by patching the file
    shapes = {"layer.0.weight": (96, 64), "layer.0.bias": (96,), "layer.1.weight": (4, 96), "position_ids": (5,)}
    models = []
    for _ in range(n):
        sd = {k: torch.randn(s, generator=g) for k, s in shapes.items() if k != "position_ids"}
        sd["position_ids"] = torch.arange(5)
        models.append(sd)
    return models


def test_ties_on_files_equals_ties_in_memory(tmp_path, capsys):
    base, *experts = random_models(4)
    paths = [save_state_dict(m, tmp_path / f"m{i}.safetensors") for i, m in enumerate([base, *experts])]
    out = tmp_path / "merged.safetensors"
    rc = main(["merge", "--method", "ties", "--base", str(paths[0]), "--models", *map(str, paths[1:]),
               "--out", str(out), "method.k=0.3", "ties.combine=mean"])
    assert rc == 0, capsys.readouterr().err
    expected = {}
    merge_sources(Ties(Params(k=0.3, combine="mean")), StateDictSource(base), [StateDictSource(e) for e in experts],
                  sink=expected)
    got = load_state_dict(out)
    assert list(got) == list(base)  # the base's key order
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_hugging_face_folders_in_and_out(tmp_path, capsys):
    base, e1, e2 = random_models(3, seed=1)
    folders = []
    for i, m in enumerate((base, e1, e2)):
        d = tmp_path / f"model{i}"
        d.mkdir()
        save_state_dict(m, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({"model_type": "toy", "i": i}))
        folders.append(str(d))
    out = tmp_path / "merged"
    assert main(["merge", "-m", "task_arithmetic", "--base", folders[0], "--models", *folders[1:], "--out", str(out),
                 "method.scaling_factor=0.5"]) == 0
    merged = load_state_dict(out / "model.safetensors")
    w = "layer.0.weight"
    assert torch.allclose(merged[w], base[w] + 0.5 * ((e1[w] - base[w]) + (e2[w] - base[w])))
    assert json.loads((out / "config.json").read_text())["i"] == 0  # the base's config travels with the weights


def test_bad_inputs_leave_no_output(tmp_path, capsys):
    base, e1 = random_models(2)
    good = save_state_dict(base, tmp_path / "base.safetensors")
    broken = save_state_dict(e1, tmp_path / "broken.safetensors")
    broken.write_bytes(broken.read_bytes()[:-100])
    out = tmp_path / "out.safetensors"
    assert main(["merge", "-m", "ties", "--base", str(good), "--models", str(broken), "--out", str(out)]) == 2
    assert "broken.safetensors is truncated" in capsys.readouterr().err

    odd = dict(e1, **{"layer.1.weight": torch.zeros(96, 4)})
    odd_path = save_state_dict(odd, tmp_path / "odd.safetensors")
    assert main(["merge", "-m", "ties", "--base", str(good), "--models", str(odd_path), "--out", str(out)]) == 2
    assert "tensor 'layer.1.weight' has shape [4, 96]" in capsys.readouterr().err

    nan = dict(e1, **{"layer.0.bias": torch.full((96,), float("nan"))})
    nan_path = save_state_dict(nan, tmp_path / "nan.safetensors")
    assert main(["merge", "-m", "ties", "--base", str(good), "--models", str(nan_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tensor 'layer.0.bias' in" in err and "96 non-finite values" in err

    assert main(["merge", "-m", "ties", "--base", str(good), "--models", str(good), "--out", str(out),
                 "method.k=0.1,0.2"]) == 2
    assert "sweeps belong to `mergebench run`" in capsys.readouterr().err
    assert not out.exists() and not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
