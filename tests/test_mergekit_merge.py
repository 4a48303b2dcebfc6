"""`mergebench merge --config`: MergeKit configs merged end to end on small Llama-named checkpoints, each output
checked against the value worked out by hand from MergeKit's formulas (no MergeKit needed), and refusals by key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mergebench_core.cli import main
from mergebench_core.engine.safetensors_reader import SafetensorsSource, load_state_dict
from mergebench_core.engine.safetensors_writer import save_state_dict

SHAPES = {"model.embed_tokens.weight": (8, 4), "lm_head.weight": (8, 4), "model.norm.weight": (4,)}
for _i in range(3):
    SHAPES |= {f"model.layers.{_i}.self_attn.q_proj.weight": (4, 4), f"model.layers.{_i}.mlp.up_proj.weight": (6, 4),
               f"model.layers.{_i}.input_layernorm.weight": (4,)}


def model_folder(root: Path, name: str, seed: int, base: dict | None = None) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: (base[k] if base else 0) + torch.randn(s, generator=g) * (0.1 if base else 1.0) for k, s in SHAPES.items()}
    folder = root / name
    folder.mkdir()
    save_state_dict(sd, folder / "model.safetensors", {"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3,
                                                    "torch_dtype": "float32", "name": name}))
    (folder / "tokenizer.json").write_text(json.dumps({"from": name}))
    return folder, sd


@pytest.fixture()
def models(tmp_path):
    base, b = model_folder(tmp_path, "base", 0)
    out = {"base": (base, b)}
    for i, name in enumerate(("x", "y", "z")):
        out[name] = model_folder(tmp_path, name, i + 1, b)
    return out


def merge(tmp_path, text: str, *extra: str, out: str = "merged") -> tuple[int, Path]:
    cfg = tmp_path / "merge.yml"
    cfg.write_text(text)
    rc = main(["merge", "--config", str(cfg), "--out", str(tmp_path / out), *extra])
    return rc, tmp_path / out


def test_linear_weights_with_a_filter_are_a_weighted_mean_per_tensor(tmp_path, models):
    text = f"""
models:
  - model: {models['x'][0]}
    parameters:
      weight: 1.0
  - model: {models['y'][0]}
    parameters:
      weight:
        - filter: mlp
          value: 3.0
        - value: 0.5
merge_method: linear
"""
    rc, out = merge(tmp_path, text)
    assert rc == 0
    got = load_state_dict(out)
    x, y = models["x"][1], models["y"][1]
    for k in SHAPES:
        w = 3.0 if "mlp" in k else 0.5
        torch.testing.assert_close(got[k], (x[k] + w * y[k]) / (1 + w), rtol=1e-6, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["name"] == "x"  # no base: the first model's files
    assert json.loads((out / "tokenizer.json").read_text()) == {"from": "x"}


def test_task_arithmetic_with_a_lambda_gradient_over_layers(tmp_path, models):
    text = f"""
merge_method: task_arithmetic
base_model: {models['base'][0]}
models:
  - model: {models['x'][0]}
    parameters: {{weight: 0.5}}
  - model: {models['y'][0]}
    parameters: {{weight: 0.5}}
parameters:
  lambda: [1.0, 3.0]
"""
    rc, out = merge(tmp_path, text)
    assert rc == 0
    got = load_state_dict(out)
    b, x, y = models["base"][1], models["x"][1], models["y"][1]
    for k in SHAPES:
        layer = int(k.split(".")[2]) if ".layers." in k else None
        lam = 1.0 if layer is None else 1.0 + 2.0 * layer / 2  # t = layer / 2, outside the layers t = 0
        torch.testing.assert_close(got[k], b[k] + lam * 0.5 * ((x[k] - b[k]) + (y[k] - b[k])), rtol=1e-5, atol=1e-6)


def ties_reference(b, experts, density, lam, normalize):
    """MergeKit's TIES on one tensor, written out: trim to the top ⌊density·n⌋ magnitudes, elect the sign of the
    sum, keep agreeing non-zero entries, sum (or average) them. Among equal magnitudes the earlier entry is kept
    (ours; MergeKit's top-k keeps any)."""
    taus = []
    for e in experts:
        tau = (e - b).flatten()
        k = int(density * tau.numel())
        keep = torch.zeros_like(tau)
        keep[tau.abs().sort(descending=True, stable=True).indices[:k]] = 1  # equal magnitudes: the earlier
        taus.append(tau * keep)
    t = torch.stack(taus)
    sign = torch.where(t.sum(0) >= 0, 1.0, -1.0)
    agree = (t.sign() == sign).float()
    mixed = (t * agree).sum(0)
    if normalize:
        mixed = mixed / agree.sum(0).clamp(min=1)
    return b + lam * mixed.view(b.shape)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_trims_elects_and_combines_per_tensor(tmp_path, models, normalize):
    text = f"""
merge_method: ties
base_model: {models['base'][0]}
models:
""" + "".join(f"""  - model: {models[n][0]}
    parameters: {{weight: 1.0, density: 0.5}}
""" for n in "xyz") + f"""parameters:
  normalize: {str(normalize).lower()}
  lambda: 0.7
  int8_mask: true
dtype: float32
out_dtype: bfloat16
"""
    rc, out = merge(tmp_path, text)
    assert rc == 0
    src = SafetensorsSource(out)
    b = models["base"][1]
    for k in SHAPES:
        assert src.dtype(k) == torch.bfloat16
        want = ties_reference(b[k], [models[n][1][k] for n in "xyz"], 0.5, 0.7, normalize)
        torch.testing.assert_close(src.get(k).float(), want.to(torch.bfloat16).float(), rtol=0, atol=1e-2)
    src.close()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "merge_method: ties" in card and "int8_mask: true" in card and "ties" in card


def slerp_reference(t, a, b):
    a64, b64 = a.double().flatten(), b.double().flatten()
    dot = float((a64 / a64.norm()) @ (b64 / b64.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * a64 + t * b64).view(a.shape).float()
    omega = math.acos(dot)
    return ((math.sin((1 - t) * omega) * a64 + math.sin(t * omega) * b64) / math.sin(omega)).view(a.shape).float()


def test_gradient_slerp_from_the_examples_folder(tmp_path, models):
    a, b = models["base"][0], models["x"][0]
    text = f"""
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
      - model: {b}
        layer_range: [0, 3]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""
    rc, out = merge(tmp_path, text)
    assert rc == 0
    got = load_state_dict(out)
    ts = {0: {"self_attn": 0.0, "mlp": 1.0}, 1: {"self_attn": 0.3, "mlp": 0.7}, 2: {"self_attn": 1.0, "mlp": 0.0}}
    for k in SHAPES:
        t = 0.5
        if ".layers." in k:
            t = next((v for f, v in ts[int(k.split(".")[2])].items() if f in k), 0.5)
        torch.testing.assert_close(got[k], slerp_reference(t, models["base"][1][k], models["x"][1][k]),
                                   rtol=1e-5, atol=1e-6)


def test_a_passthrough_frankenmerge_stacks_layers_and_says_so_in_config_json(tmp_path, models):
    a, b = models["x"], models["y"]
    text = f"""
slices:
  - sources:
    - model: {a[0]}
      layer_range: [0, 2]
  - sources:
    - model: {b[0]}
      layer_range: [1, 3]
    parameters:
      scale:
        - filter: mlp
          value: 2.0
        - value: 1.0
merge_method: passthrough
dtype: float16
"""
    rc, out = merge(tmp_path, text)
    assert rc == 0
    got = load_state_dict(out)
    assert len(got) == 4 * 3 + 3
    assert torch.equal(got["model.layers.1.self_attn.q_proj.weight"],
                       a[1]["model.layers.1.self_attn.q_proj.weight"].half())
    assert torch.equal(got["model.layers.2.self_attn.q_proj.weight"],
                       b[1]["model.layers.1.self_attn.q_proj.weight"].half())
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], b[1]["model.layers.2.mlp.up_proj.weight"].half() * 2)
    assert torch.equal(got["model.embed_tokens.weight"], a[1]["model.embed_tokens.weight"].half())
    assert torch.equal(got["model.norm.weight"], b[1]["model.norm.weight"].half())
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["torch_dtype"] == "float16"


def test_a_small_shard_size_writes_shards_and_an_index_with_the_same_tensors(tmp_path, models):
    text = f"""
merge_method: linear
models:
  - model: {models['x'][0]}
    parameters: {{weight: 1}}
  - model: {models['y'][0]}
    parameters: {{weight: 1}}
"""
    rc, whole = merge(tmp_path, text, out="whole")
    assert rc == 0
    rc, sharded = merge(tmp_path, text, "--out-shard-size", "200", out="sharded")
    assert rc == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(SHAPES) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(4 * math.prod(s) for s in SHAPES.values())
    assert not (whole / "model.safetensors.index.json").exists() and (whole / "model.safetensors").is_file()
    a, b = load_state_dict(whole), load_state_dict(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plain_merges_into_a_folder_shard_too(tmp_path, models):
    rc = main(["merge", "--method", "simple_average", "--models", str(models["x"][0]), str(models["y"][0]),
               "--out", str(tmp_path / "avg"), "--out-shard-size", "200"])
    assert rc == 0
    assert (tmp_path / "avg" / "model.safetensors.index.json").is_file()
    got = load_state_dict(tmp_path / "avg")
    for k in SHAPES:
        torch.testing.assert_close(got[k], (models["x"][1][k] + models["y"][1][k]) / 2)


def test_shard_sizes_use_mergekits_syntax():
    from mergebench_core.engine.sharded_writer import parse_shard_size
    from mergebench_core.errors import MergebenchError

    assert parse_shard_size("5B") == 5_000_000_000
    assert parse_shard_size("500m") == 500_000_000 and parse_shard_size("2k") == 2000 and parse_shard_size("0") == 0
    with pytest.raises(MergebenchError, match="--out-shard-size"):
        parse_shard_size("5GB")


@pytest.mark.parametrize(("body", "key"), [
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {x}\n    parameters: {{weight: 1, density: 0.5}}\n"
     "  - model: {y}\n    parameters: {{weight: 1, density: 0.3}}\n", "models[0].parameters.density"),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {x}\n    parameters: {{weight: 1, dens1ty: 0.5}}\n",
     "models[0].parameters.dens1ty"),
    ("merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {x}\n    parameters: {{weight: 1}}\n"
     "  - model: {y}\n    parameters: {{weight: [1, 2]}}\n", "models[1].parameters.weight"),
    ("merge_method: ties\nmodels:\n  - model: {x}\n    parameters: {{weight: 1}}\n", "base_model"),
    ("merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {x}\n    parameters: {{weight: 1}}\n",
     "base_model"),
    ("merge_method: no_such_method\nmodels:\n  - model: {x}\n", "merge_method"),
    ("merge_method: passthrough\nslices:\n  - sources:\n    - model: {x}\n      layer_range: [0, 4]\n",
     "slices[0].sources[0].layer_range"),
    ("merge_method: linear\nmodels:\n  - model: {x}/../y\n    parameters: {{weight: 1}}\n", "models[0].model"),
    ("merge_method: linear\nmodels:\n  - model: /etc\n    parameters: {{weight: 1}}\n", "models[0].model"),
    ("merge_method: linear\nmodels:\n  - model: nobody/nothing-here\n    parameters: {{weight: 1}}\n",
     "models[0].model"),
])
def test_configs_we_cannot_honour_exit_2_naming_the_key_and_write_nothing(tmp_path, models, capsys, body, key,
                                                                          monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    text = body.format(base=models["base"][0], x=models["x"][0], y=models["y"][0])
    rc, out = merge(tmp_path, text, "--parents", out="new/merged")
    assert rc == 2
    err = capsys.readouterr().err
    assert key + ":" in err, err
    assert not (tmp_path / "new").exists()


def test_a_folder_outside_the_allowed_ones_can_be_allowed_with_models_dir(tmp_path, models, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    folder, sd = model_folder(elsewhere, "far", 7)
    text = f"merge_method: linear\nmodels:\n  - model: {folder}\n    parameters: {{weight: 1}}\n"
    sub = tmp_path / "cfg"
    sub.mkdir()
    (sub / "merge.yml").write_text(text)
    args = ["merge", "--config", str(sub / "merge.yml"), "--out", str(tmp_path / "out")]
    assert main(args) == 2  # the working directory (tmp_path's parent is not it) and the config's folder only
    assert main(args + ["--models-dir", str(elsewhere)]) == 0
    assert torch.equal(load_state_dict(tmp_path / "out")["lm_head.weight"], sd["lm_head.weight"])


def test_a_symlinked_model_leading_outside_counts_where_it_leads(tmp_path, models, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("secret")
    folder, _ = model_folder(elsewhere, "private", 9)
    (tmp_path / "innocent").symlink_to(folder)
    text = f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'innocent'}\n    parameters: {{weight: 1}}\n"
    rc, out = merge(tmp_path, text)
    assert rc == 2 and not out.exists()


def test_config_and_method_options_do_not_mix(tmp_path, models, capsys):
    (tmp_path / "merge.yml").write_text(f"merge_method: linear\nmodels:\n  - model: {models['x'][0]}\n")
    rc = main(["merge", "--config", str(tmp_path / "merge.yml"), "--method", "ties", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--method" in capsys.readouterr().err
    assert main(["merge", "--out", str(tmp_path / "o")]) == 2


def test_a_new_merge_into_an_old_output_folder_leaves_no_shadowing_weights(tmp_path, models):
    text = (f"merge_method: linear\nmodels:\n  - model: {models['x'][0]}\n    parameters: {{weight: 1}}\n"
            f"  - model: {models['y'][0]}\n    parameters: {{weight: 1}}\n")
    rc, out = merge(tmp_path, text, "--out-shard-size", "200")
    assert rc == 0 and (out / "model.safetensors.index.json").is_file()
    (out / "notes.txt").write_text("mine")
    rc, out = merge(tmp_path, text)  # one file now: the shards and their index would mislead a loader
    assert rc == 0
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert (out / "notes.txt").read_text() == "mine"
    rc, out = merge(tmp_path, text, "--out-shard-size", "200")  # and back: model.safetensors would shadow them
    assert rc == 0 and not (out / "model.safetensors").exists()


def test_a_hugging_face_repository_id_is_found_in_the_local_cache(tmp_path, models, monkeypatch):
    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    import shutil

    shutil.copytree(models["x"][0], repo / "snapshots" / "abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    text = f"merge_method: linear\nmodels:\n  - model: org/tiny\n    parameters: {{weight: 1}}\n"
    rc, out = merge(tmp_path, text)
    assert rc == 0
    assert torch.equal(load_state_dict(out)["lm_head.weight"], models["x"][1]["lm_head.weight"])
    assert "org/tiny" in (out / "README.md").read_text()


def test_a_shard_size_for_a_single_file_output_is_refused(tmp_path, models, capsys):
    rc = main(["merge", "--method", "simple_average", "--models", str(models["x"][0]), str(models["y"][0]),
               "--out", str(tmp_path / "one.safetensors"), "--out-shard-size", "1M"])
    assert rc == 2 and "--out-shard-size" in capsys.readouterr().err


def breadcrumbs_reference(b, experts, density, gamma, scale):
    """MergeKit's breadcrumbs on one tensor, written out: per task, of the magnitudes sorted ascending keep those
    between the smallest (n − ⌊density·n⌋ − ⌊gamma·n⌋) and the top ⌊gamma·n⌋."""
    total = torch.zeros_like(b).flatten()
    for e in experts:
        tau = (e - b).flatten()
        n = tau.numel()
        target, top = int(n * density), int(n * gamma)
        bottom = n - target - top
        if bottom < 0:
            bottom, top = 0, n - target
        order = tau.abs().argsort()
        keep = torch.zeros_like(tau)
        keep[order[bottom:n - top]] = 1
        total += tau * keep
    return b + scale * total.view(b.shape)


def test_breadcrumbs_drops_the_largest_and_the_smallest(tmp_path, models):
    text = f"""
merge_method: breadcrumbs
base_model: {models['base'][0]}
models:
  - model: {models['x'][0]}
    parameters: {{weight: 0.5, density: 0.5, gamma: 0.2}}
  - model: {models['y'][0]}
    parameters: {{weight: 0.5, density: 0.5, gamma: 0.2}}
parameters: {{lambda: 1.5}}
"""
    rc, out = merge(tmp_path, text)
    assert rc == 0
    got = load_state_dict(out)
    b = models["base"][1]
    for k in SHAPES:
        want = breadcrumbs_reference(b[k], [models["x"][1][k], models["y"][1][k]], 0.5, 0.2, 0.75)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)


def test_other_registered_methods_take_parameters_by_field_name(tmp_path, models):
    """magmax is no MergeKit method: by its registered name, `lambda` sets its scaling_factor."""
    text = f"""
merge_method: magmax
base_model: {models['base'][0]}
models:
  - model: {models['x'][0]}
  - model: {models['y'][0]}
parameters: {{lambda: 0.25}}
"""
    rc, out = merge(tmp_path, text)
    assert rc == 0
    got = load_state_dict(out)
    b, x, y = models["base"][1], models["x"][1], models["y"][1]
    for k in SHAPES:
        tx, ty = x[k] - b[k], y[k] - b[k]
        torch.testing.assert_close(got[k], b[k] + 0.25 * torch.where(tx.abs() > ty.abs(), tx, ty), rtol=1e-5,
                                   atol=1e-6)


def test_a_per_model_parameter_fills_a_field_of_one_value_per_model(tmp_path, models):
    text = f"""
merge_method: weighted_average
models:
  - model: {models['x'][0]}
    parameters: {{weight: 1.0}}
  - model: {models['y'][0]}
    parameters: {{weight: 3.0}}
"""
    rc, out = merge(tmp_path, text)
    assert rc == 0
    got = load_state_dict(out)
    for k in SHAPES:
        torch.testing.assert_close(got[k], 0.25 * models["x"][1][k] + 0.75 * models["y"][1][k])


def test_a_parameter_a_registered_method_lacks_is_refused_by_key(tmp_path, models, capsys):
    text = f"""
merge_method: magmax
base_model: {models['base'][0]}
models:
  - model: {models['x'][0]}
    parameters: {{density: 0.5}}
"""
    rc, _ = merge(tmp_path, text)
    assert rc == 2 and "models[0].parameters.density:" in capsys.readouterr().err


def test_large_tensors_stream_in_blocks_rounded_to_dtype(tmp_path):
    """A tensor larger than a block is read block by block, each rounded to `dtype` on the way in: the same bits for
    1 MiB blocks as for one block, and the value of the arithmetic on the rounded inputs."""
    g = torch.Generator().manual_seed(3)
    shapes = {"model.layers.0.mlp.up_proj.weight": (700, 500), "model.norm.weight": (500,)}
    sds = {}
    for name in ("base", "x", "y"):
        sds[name] = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        (tmp_path / name).mkdir()
        save_state_dict(sds[name], tmp_path / name / "model.safetensors", {"format": "pt"})
    text = f"""
merge_method: ties
base_model: {tmp_path / 'base'}
models:
  - model: {tmp_path / 'x'}
    parameters: {{weight: 1, density: 0.3}}
  - model: {tmp_path / 'y'}
    parameters: {{weight: 1, density: 0.3}}
dtype: bfloat16
out_dtype: float32
"""
    rc, small = merge(tmp_path, text, "--block-mb", "1", out="small")
    assert rc == 0
    rc, big = merge(tmp_path, text, "--block-mb", "64", out="big")
    assert rc == 0
    a, b = load_state_dict(small), load_state_dict(big)
    r = {n: {k: v.bfloat16().float() for k, v in sd.items()} for n, sd in sds.items()}
    for k in shapes:
        assert torch.equal(a[k], b[k])
        want = ties_reference(r["base"][k], [r["x"][k], r["y"][k]], 0.3, 1.0, True).bfloat16().float()
        torch.testing.assert_close(a[k], want, rtol=0, atol=1e-2)
        assert (a[k] != want).float().mean() < 1e-3  # rounding of the last bf16 bit at most, rarely


def test_an_output_folder_that_is_an_input_is_refused(tmp_path, models, capsys):
    text = f"merge_method: linear\nmodels:\n  - model: {models['x'][0]}\n    parameters: {{weight: 1}}\n"
    rc, _ = merge(tmp_path, text, out="x")
    assert rc == 2 and "replace" in capsys.readouterr().err
    rc = main(["merge", "--method", "simple_average", "--models", str(models["x"][0]), str(models["y"][0]),
               "--out", str(models["y"][0])])
    assert rc == 2 and "replace" in capsys.readouterr().err
    assert torch.equal(load_state_dict(models["y"][0])["lm_head.weight"], models["y"][1]["lm_head.weight"])


def test_methods_added_by_plugins_run_under_mergekits_names_with_mergekits_defaults(tmp_path, models):
    # della_linear with no density: MergeKit's default 1.0 (nothing pruned), not the plugin's 0.2, so the result is
    # θ_0 + λ Σ w_t τ_t with per-model weights; int8_mask is accepted and changes nothing
    b = models["base"][1]
    text = f"""
merge_method: della_linear
base_model: {models['base'][0]}
models:
  - model: {models['x'][0]}
    parameters: {{weight: 0.5}}
  - model: {models['y'][0]}
    parameters: {{weight: 2.0}}
parameters: {{lambda: 0.5, int8_mask: true}}
"""
    rc, out = merge(tmp_path, text)
    assert rc == 0
    got = load_state_dict(out)
    x, y = models["x"][1], models["y"][1]
    for k in SHAPES:
        expected = b[k] + 0.5 * (0.5 * (x[k] - b[k]) + 2.0 * (y[k] - b[k]))
        torch.testing.assert_close(got[k], expected, rtol=1e-5, atol=1e-6)
    # multislerp takes the base when one is named: two task vectors with equal weights → their bisector direction,
    # at their mean norm (per tensor)
    text = f"""
merge_method: multislerp
base_model: {models['base'][0]}
models:
  - model: {models['x'][0]}
    parameters: {{weight: 1.0}}
  - model: {models['y'][0]}
    parameters: {{weight: 1.0}}
"""
    rc, out = merge(tmp_path, text, out="spherical")
    assert rc == 0
    got = load_state_dict(out)
    for k in SHAPES:
        tx, ty = (x[k] - b[k]).reshape(-1), (y[k] - b[k]).reshape(-1)
        direction = tx / tx.norm() + ty / ty.norm()
        expected = b[k] + (direction / direction.norm() * (tx.norm() + ty.norm()) / 2).view(b[k].shape)
        torch.testing.assert_close(got[k], expected, rtol=1e-5, atol=1e-5)
