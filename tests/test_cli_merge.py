"""`mergebench merge` on checkpoint files: same numbers as in memory, folders in and out, errors before output."""

import json

import torch

from mergebench_core.cli import main
from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource, load_state_dict, save_state_dict
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


# --- methods with one model per task, ensembles, slerp.models, non-matrix tensors -------------------------------


def write_models(tmp_path, models, names):
    return [save_state_dict(m, tmp_path / f"{n}.safetensors") for m, n in zip(models, names)]


def test_per_task_methods_write_one_file_per_task(tmp_path, capsys):
    from mergebench_emr import Emr
    from mergebench_tall_masks import TallMasks

    base, *experts = random_models(4, seed=2)
    paths = write_models(tmp_path, [base, *experts], ["base", "cars", "dtd", "svhn"])
    for method_cls in (Emr, TallMasks):
        expected = [{} for _ in experts]
        merge_sources(method_cls(), StateDictSource(base), [StateDictSource(e) for e in experts], sink=expected)
        out = tmp_path / f"out-{method_cls.name}"
        rc = main(["merge", "-m", method_cls.name, "--base", str(paths[0]), "--models", *map(str, paths[1:]),
                   "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["cars.safetensors", "dtd.safetensors", "svhn.safetensors"]
        for task, want in zip(["cars", "dtd", "svhn"], expected):
            got = load_state_dict(out / f"{task}.safetensors")
            assert list(got) == list(base) and all(torch.equal(got[k], want[k]) for k in want), (method_cls, task)
        # names from --task-names
        named = tmp_path / f"named-{method_cls.name}"
        assert main(["merge", "-m", method_cls.name, "--base", str(paths[0]), "--models", *map(str, paths[1:]),
                     "--out", str(named), "--task-names", "a,b", "--task-names", "c"]) == 0
        assert sorted(p.name for p in named.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]
        # one output file cannot hold several models
        assert main(["merge", "-m", method_cls.name, "--base", str(paths[0]), "--models", *map(str, paths[1:]),
                     "--out", str(tmp_path / "one.safetensors")]) == 2
        assert "one model per task: give --out a folder" in capsys.readouterr().err
    assert main(["merge", "-m", "emr", "--base", str(paths[0]), "--models", *map(str, paths[1:]),
                 "--out", str(tmp_path / "x"), "--task-names", "a,b"]) == 2
    assert "gives 2 names for 3 models" in capsys.readouterr().err
    same = [str(paths[1]), str(tmp_path / "dup" / "cars.safetensors")]
    (tmp_path / "dup").mkdir()
    save_state_dict(experts[1], tmp_path / "dup" / "cars.safetensors")
    assert main(["merge", "-m", "emr", "--base", str(paths[0]), "--models", *same, "--out", str(tmp_path / "y")]) == 2
    assert "not distinct" in capsys.readouterr().err


def test_methods_that_cannot_merge_files_say_why(tmp_path, capsys):
    base, e1 = random_models(2)
    paths = write_models(tmp_path, [base, e1], ["base", "e1"])
    for method, words in [("ensemble", "output ensemble"), ("weighted_ensemble", "output ensemble"),
                          ("fisher", "needs labeled data"), ("adamerging_tw", "needs unlabeled data")]:
        rc = main(["merge", "-m", method, "--base", str(paths[0]), "--models", str(paths[1]),
                   "--out", str(tmp_path / "o.safetensors")])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "mergebench run --method" in err, (method, err)


def test_slerp_models_choose_two_of_the_files(tmp_path, capsys):
    from mergebench_slerp import Params as SlerpParams
    from mergebench_slerp import Slerp

    models = random_models(3, seed=3)
    paths = write_models(tmp_path, models, ["m0", "m1", "m2"])
    out = tmp_path / "s.safetensors"
    assert main(["merge", "-m", "slerp", "--models", *map(str, paths), "--out", str(out),
                 "slerp.models=[m0,m2]", "slerp.t=0.25"]) == 0, capsys.readouterr().err
    want = {}
    merge_sources(Slerp(SlerpParams(t=0.25)), None, [StateDictSource(models[0]), StateDictSource(models[2])],
                  sink=want)
    got = load_state_dict(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert main(["merge", "-m", "slerp", "--models", *map(str, paths), "--out", str(out)]) == 2
    assert "exactly two models, but 3 were given: m0, m1, m2" in capsys.readouterr().err
    assert main(["merge", "-m", "slerp", "--models", *map(str, paths), "--out", str(out),
                 "slerp.models=[m0,zz]"]) == 2
    assert "not among the models" in capsys.readouterr().err
    # --task-names rename the files for slerp.models too
    assert main(["merge", "-m", "slerp", "--models", *map(str, paths), "--out", str(out), "--task-names", "a,b,c",
                 "slerp.models=[a,c]", "slerp.t=0.25"]) == 0
    assert all(torch.equal(load_state_dict(out)[k], want[k]) for k in want)


def data_free_methods():
    from mergebench_core.engine.merging import TensorMergeMethod
    from mergebench_core.contract.registry import get_registry

    return sorted(n for n, r in get_registry().methods.items() if issubclass(r.obj, TensorMergeMethod))


ONE_MODEL = {"arcee_fusion", "passthrough"}
"""Methods that take one expert (beside the base): told which with `<method>.model=`."""


def test_every_data_free_method_merges_non_matrix_tensors(tmp_path, capsys):
    """A 4-D convolution, a 3-D tensor, a 0-d scalar and a 1-entry vector beside a matrix, in every data-free
    method, through files, in float32 and bfloat16."""
    g = torch.Generator().manual_seed(5)
    shapes = {"conv.weight": (8, 4, 3, 3), "attn.in_proj": (3, 6, 5), "logit_scale": (), "one": (1,),
              "fc.weight": (16, 12), "fc.bias": (16,)}
    for dtype in (torch.float32, torch.bfloat16):
        models = [{k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()} for _ in range(3)]
        paths = write_models(tmp_path, models, [f"base{dtype}"[:8], "e1", "e2"])
        methods = data_free_methods()
        assert {"ties", "tsv_m", "iso_cts", "wudi", "emr", "tall_masks", "slerp", "model_stock"} <= set(methods)
        for method in methods:
            out = tmp_path / f"{method}-{str(dtype)[6:]}"
            choice = [f"{method}.model=e1"] if method in ONE_MODEL else []  # they merge one expert: name it
            rc = main(["merge", "-m", method, "--base", str(paths[0]), "--models", *map(str, paths[1:]),
                       "--out", str(out), *choice])
            assert rc == 0, (method, capsys.readouterr().err)
            files = sorted(out.glob("*.safetensors"))
            assert len(files) in (1, 2), method
            for f in files:
                got = load_state_dict(f)
                for k, s in shapes.items():
                    assert got[k].shape == s and got[k].dtype == dtype and torch.isfinite(got[k].float()).all(), \
                        (method, k)
