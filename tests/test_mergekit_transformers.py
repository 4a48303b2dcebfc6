"""What `mergebench merge --config` writes loads in `transformers` and generates: a tiny Llama saved with
`save_pretrained`, merged whole (TIES), sharded, and as a passthrough frankenmerge with more layers than its inputs."""

from __future__ import annotations

import json

import pytest
import torch

from mergebench_core.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "base", safe_serialization=True)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(2):
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(base[k] + 0.01 * torch.randn_like(base[k]))
        model.save_pretrained(root / f"expert{i}", safe_serialization=True)
    return root


def load_and_generate(folder, layers: int):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == layers
    out = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    return model


def run(tmp_path, llamas, text, *extra, out="merged"):
    (tmp_path / "merge.yml").write_text(text)
    # the module's checkpoints lie outside this test's folder: allowed by --models-dir
    assert main(["merge", "--config", str(tmp_path / "merge.yml"), "--out", str(tmp_path / out),
                 "--models-dir", str(llamas), *extra]) == 0
    return tmp_path / out


def test_a_ties_merge_loads_and_generates_and_its_weights_are_the_merge(tmp_path, llamas):
    text = f"""
merge_method: ties
base_model: {llamas / 'base'}
models:
  - model: {llamas / 'expert0'}
    parameters: {{weight: 1.0, density: 1.0}}
  - model: {llamas / 'expert1'}
    parameters: {{weight: 1.0, density: 1.0}}
parameters: {{lambda: 0.0}}
tokenizer_source: base
"""
    out = run(tmp_path, llamas, text)
    model = load_and_generate(out, 2)
    base = transformers.AutoModelForCausalLM.from_pretrained(llamas / "base")
    for (k, a), (_, b) in zip(model.state_dict().items(), base.state_dict().items()):
        assert torch.equal(a, b), k  # λ = 0: the base, exactly
    assert (out / "generation_config.json").is_file() and (out / "README.md").is_file()


def test_sharded_output_loads_through_its_index(tmp_path, llamas):
    text = f"""
merge_method: linear
models:
  - model: {llamas / 'expert0'}
    parameters: {{weight: 1.0}}
  - model: {llamas / 'expert1'}
    parameters: {{weight: 1.0}}
"""
    out = run(tmp_path, llamas, text, "--out-shard-size", "4K")
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    model = load_and_generate(out, 2)
    e0 = transformers.AutoModelForCausalLM.from_pretrained(llamas / "expert0").state_dict()
    e1 = transformers.AutoModelForCausalLM.from_pretrained(llamas / "expert1").state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, (e0[k] + e1[k]) / 2)


def test_a_frankenmerge_with_three_layers_loads_as_a_three_layer_model(tmp_path, llamas):
    text = f"""
slices:
  - sources:
    - model: {llamas / 'expert0'}
      layer_range: [0, 2]
  - sources:
    - model: {llamas / 'expert1'}
      layer_range: [1, 2]
merge_method: passthrough
dtype: bfloat16
"""
    out = run(tmp_path, llamas, text)
    model = load_and_generate(out, 3)
    assert model.dtype == torch.bfloat16
    e1 = transformers.AutoModelForCausalLM.from_pretrained(llamas / "expert1").state_dict()
    got = model.state_dict()
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], e1["model.layers.1.mlp.up_proj.weight"].bfloat16())
