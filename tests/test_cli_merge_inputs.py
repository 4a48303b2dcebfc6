"""`mergebench merge` refusing bad input before (or instead of) writing: non-finite outputs, block sizes, seeds,
output paths, and checkpoints split into more shards than the process may hold open."""

import json
import os
import resource
import uuid

import pytest
import torch

from mergebench_core.cli import main
from mergebench_core.cli.arguments import parse_seeds
from mergebench_core.engine.data_free import merge_sources
from mergebench_core.engine.safetensors_reader import SafetensorsSource, load_state_dict
from mergebench_core.engine.safetensors_writer import save_state_dict
from mergebench_core.engine.sources import StateDictSource
from mergebench_core.errors import MergebenchError
from mergebench_task_arithmetic import Params, TaskArithmetic


def small_models(tmp_path, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (8, 4), "a.bias": (8,), "b.weight": (2, 8)}
    models = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n)]
    paths = [str(save_state_dict(m, tmp_path / f"m{i}.safetensors")) for i, m in enumerate(models)]
    return models, paths


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- 1. a merge that produces NaN or inf writes nothing -------------------------------------------------------------
def overflowing_half_models(tmp_path):
    """float16 checkpoints whose task vectors sum past float16's largest value (65504): task arithmetic at scaling
    factor 1 gives +inf in every entry, from finite inputs."""
    base = {"w": torch.zeros(4, 4, dtype=torch.float16), "b": torch.zeros(4, dtype=torch.float16)}
    expert = {k: torch.full_like(v, 60000.0) for k, v in base.items()}
    return [str(save_state_dict(m, tmp_path / f"{n}.safetensors"))
            for m, n in ((base, "base"), (expert, "e1"), (expert, "e2"))]


def test_a_merge_with_non_finite_output_exits_2_and_writes_nothing(tmp_path, capsys):
    base, e1, e2 = overflowing_half_models(tmp_path)
    for out in (tmp_path / "merged.safetensors", tmp_path / "new-folder"):
        rc = main(["merge", "-m", "task_arithmetic", "--base", base, "--models", e1, e2, "--out", str(out),
                   "method.scaling_factor=1.0"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "method 'task_arithmetic' produced 16 non-finite values (NaN or inf) in tensor 'w'" in err
        assert "nothing was written" in err and "scaling_factor" in err
        assert not out.exists() and leftovers(tmp_path) == []
    # the same inputs at a scaling factor that fits float16 merge fine: the check refuses results, not inputs
    out = tmp_path / "fine.safetensors"
    assert main(["merge", "-m", "task_arithmetic", "--base", base, "--models", e1, e2, "--out", str(out),
                 "method.scaling_factor=0.5"]) == 0
    assert torch.equal(load_state_dict(out)["w"], torch.full((4, 4), 60000.0, dtype=torch.float16))


# --- 2. --block-mb ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-1", "1e-9", "0.5", "nan", "inf", "-inf", "1048577"])
def test_block_sizes_outside_1_mib_to_1_tib_are_refused(tmp_path, capsys, value):
    models, paths = small_models(tmp_path)
    out = tmp_path / "out.safetensors"
    assert main(["merge", "-m", "task_arithmetic", "--base", paths[0], "--models", *paths[1:], "--out", str(out),
                 f"--block-mb={value}"]) == 2
    err = capsys.readouterr().err
    assert "--block-mb" in err and "from 1 to 1048576 (1 TiB)" in err and "unexpected" not in err
    assert not out.exists()


def test_block_sizes_at_the_bounds_merge_as_the_default_does(tmp_path, capsys):
    models, paths = small_models(tmp_path)
    outputs = []
    for value in ("1", "16", "1048576"):
        out = tmp_path / f"out-{value}.safetensors"
        assert main(["merge", "-m", "task_arithmetic", "--base", paths[0], "--models", *paths[1:], "--out", str(out),
                     "--block-mb", value]) == 0, capsys.readouterr().err
        outputs.append(load_state_dict(out))
    assert all(torch.equal(o[k], outputs[0][k]) for o in outputs[1:] for k in outputs[0])


# --- 4. seeds ---------------------------------------------------------------------------------------------------------
def test_seed_lists_are_integers_at_least_0_without_gaps_or_repeats():
    assert parse_seeds(None) == [0]
    assert parse_seeds(["0,1", " 2"]) == [0, 1, 2]
    for given, problem in ((["0,,1"], "has an empty item"), (["0,"], "has an empty item"), (["-1"], "is negative"),
                           (["0,1", "1"], "seed 1 more than once"), (["x"], "'x' is not an integer")):
        with pytest.raises(MergebenchError, match=problem):
            parse_seeds(given)


def test_run_and_merge_refuse_bad_seeds_with_exit_2(cli_env, capsys):
    for seed in ("0,,1", "-1", "2,2"):
        assert main(["run", "-m", "task_arithmetic", "--seed", seed]) == 2
        assert "--seed" in capsys.readouterr().err
    assert not (cli_env / "results.sqlite").exists()  # refused before the store is opened
    models, paths = small_models(cli_env)
    out = cli_env / "out.safetensors"
    assert main(["merge", "-m", "dare_ta", "--base", paths[0], "--models", *paths[1:], "--out", str(out),
                 "--seed=-1"]) == 2
    assert "seed -1 is negative" in capsys.readouterr().err and not out.exists()
    assert main(["merge", "-m", "dare_ta", "--base", paths[0], "--models", *paths[1:], "--out", str(out),
                 "--seed", "3"]) == 0


# --- 5. output paths ------------------------------------------------------------------------------------------------
def test_a_missing_parent_folder_needs_parents(tmp_path, capsys):
    models, paths = small_models(tmp_path)
    args = ["merge", "-m", "task_arithmetic", "--base", paths[0], "--models", *paths[1:]]
    root = f"/nonexistent-mergebench-{uuid.uuid4().hex}"  # a folder at the filesystem root, never there before
    assert main([*args, "--out", f"{root}/dir/x"]) == 2
    err = capsys.readouterr().err
    assert f"the folder {root}/dir does not exist" in err and "--parents" in err
    assert not os.path.exists(root)
    for out in (tmp_path / "a" / "b" / "m.safetensors", tmp_path / "c" / "d" / "folder"):
        assert main([*args, "--out", str(out)]) == 2
        assert f"the folder {out.parent} does not exist" in capsys.readouterr().err
        assert not out.parents[1].exists()
        assert main([*args, "--out", str(out), "--parents"]) == 0, capsys.readouterr().err
        written = out if out.suffix else out / "model.safetensors"
        assert list(load_state_dict(written)) == list(models[0])
    # --out itself may be new (a folder it creates), and an existing folder takes the files
    assert main([*args, "--out", str(tmp_path / "fresh")]) == 0
    assert main([*args, "--out", str(tmp_path / "fresh")]) == 0
    assert (tmp_path / "fresh" / "model.safetensors").is_file() and leftovers(tmp_path) == []
    assert main([*args, "--out", str(tmp_path / "m0.safetensors" / "x.safetensors")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


# --- 3. thousands of shards ---------------------------------------------------------------------------------------
def sharded(folder, state):
    """`state` as one shard per tensor, with the index a Hugging Face folder has."""
    folder.mkdir()
    weight_map = {}
    for i, (key, value) in enumerate(state.items()):
        name = f"model-{i:05d}-of-{len(state):05d}.safetensors"
        save_state_dict({key: value}, folder / name)
        weight_map[key] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return str(folder)


def test_more_shards_than_open_files_allowed_still_merge(tmp_path, capsys):
    g = torch.Generator().manual_seed(5)
    n_shards = 300
    models = [{f"layer.{i}.weight": torch.randn(3, generator=g) for i in range(n_shards)} for _ in range(3)]
    folders = [sharded(tmp_path / f"model{j}", m) for j, m in enumerate(models)]
    expected = {}
    merge_sources(TaskArithmetic(Params(scaling_factor=0.4)), StateDictSource(models[0]),
                  [StateDictSource(m) for m in models[1:]], sink=expected)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 120, hard))  # fewer than the 900 shard files
    try:
        out = tmp_path / "merged"
        rc = main(["merge", "-m", "task_arithmetic", "--base", folders[0], "--models", *folders[1:], "--out", str(out),
                   "method.scaling_factor=0.4"])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert rc == 0, capsys.readouterr().err
    got = load_state_dict(out / "model.safetensors")
    assert list(got) == list(models[0]) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_source_keeps_a_bounded_number_of_files_open(tmp_path):
    g = torch.Generator().manual_seed(6)
    state = {f"t{i}": torch.randn(2, generator=g) for i in range(40)}
    src = SafetensorsSource(sharded(tmp_path / "model", state))
    src.max_open_files = 4
    for _ in range(2):
        for key in src.keys():
            assert torch.equal(src.get(key), state[key])
            assert len(src._fds) <= 4
    src.close()
    assert not src._fds and torch.equal(src.get("t0"), state["t0"])  # reopened on demand
