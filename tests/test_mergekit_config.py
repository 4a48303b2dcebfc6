"""MergeKit configs: reading them (refusal by key), evaluating parameters per tensor, and planning the output tensors.

The configs are modelled on MergeKit's examples folder (gradient-slerp, orcamini-platy-44layer frankenmerge, ties,
linear); the expected values are worked out by hand from MergeKit's documented rules."""

from __future__ import annotations

import pytest
import torch
import yaml

from mergebench_core.mergekit.config import Conditional, MergeKitConfigError, parse_config
from mergebench_core.mergekit.plan import effective_config, plan_tensors, split_layer
from mergebench_core.mergekit.settings import evaluate, lookup

GRADIENT_SLERP = """
slices:
  - sources:
      - model: a
        layer_range: [0, 3]
      - model: b
        layer_range: [0, 3]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
"""

FRANKEN = """
slices:
  - sources:
    - model: a
      layer_range: [0, 2]
  - sources:
    - model: b
      layer_range: [1, 3]
merge_method: passthrough
dtype: float16
"""

TIES = """
models:
  - model: x
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: y
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: z
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def cfg(text: str):
    return parse_config(yaml.safe_load(text), text=text)


def keys_of(layers: int) -> list[str]:
    inner = ["self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"]
    return (["lm_head.weight", "model.embed_tokens.weight"]
            + [f"model.layers.{i}.{n}" for i in range(layers) for n in inner] + ["model.norm.weight"])


def test_gradients_interpolate_between_neighbours_and_filters_take_the_first_match():
    setting = (Conditional((0, 0.5, 0.3, 0.7, 1), "self_attn"), Conditional((1, 0.5, 0.7, 0.3, 0), "mlp"),
               Conditional(0.5))
    # t = 0.3 over 5 points: 1.2 -> 0.8 * 0.5 + 0.2 * 0.3
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 0.3) == pytest.approx(0.46)
    assert evaluate(setting, "model.layers.1.mlp.up_proj.weight", 0.3) == pytest.approx(0.8 * 0.5 + 0.2 * 0.7)
    assert evaluate(setting, "model.norm.weight", 0.3) == 0.5
    assert evaluate((0.0, 1.0), "x", 1.0) == 1.0
    assert evaluate(("a", "b", "c"), "x", 0.6) == "b"  # a step: entry int(0.6 * 2)
    assert evaluate((Conditional(1.0, "mlp"),), "attn", 0.0) is None  # no filter matches


def test_per_model_parameters_come_before_the_top_level_ones():
    c = effective_config(cfg(TIES), {m: keys_of(3) for m in ("x", "y", "z", "base")})
    name = "model.layers.2.mlp.up_proj.weight"
    assert lookup(c, "density", slice_index=0, source_index=0, tensor_name=name, t=0.5) == pytest.approx(0.7)
    assert lookup(c, "weight", slice_index=0, source_index=1, tensor_name=name, t=0.5) == pytest.approx(0.5)
    assert lookup(c, "weight", slice_index=0, source_index=2, tensor_name=name, t=0.5) == 0.5
    assert lookup(c, "weight", slice_index=0, source_index=2, tensor_name="model.norm.weight", t=0.5) == 0
    assert lookup(c, "normalize", slice_index=0, source_index=None, tensor_name=name, t=0.5) is True
    assert lookup(c, "density", slice_index=0, source_index=None, tensor_name=name, t=0.5) is None
    assert [s.model for s in c.slices[0].sources] == ["x", "y", "z", "base"]  # the base joins as a source


def test_models_syntax_plans_every_layer_at_its_place_in_the_gradient():
    c = effective_config(cfg(TIES), {m: keys_of(3) for m in ("x", "y", "z", "base")})
    plans, layers = plan_tensors(c, {m: keys_of(3) for m in ("x", "y", "z", "base")})
    assert layers == 3
    assert [p.out_name for p in plans][:2] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert [p.out_name for p in plans][-2:] == ["lm_head.weight", "model.norm.weight"]  # after the layers
    t = {p.out_name: p.t for p in plans}
    assert t["model.layers.0.mlp.up_proj.weight"] == 0.0
    assert t["model.layers.1.mlp.up_proj.weight"] == 0.5
    assert t["model.layers.2.mlp.up_proj.weight"] == 1.0
    assert t["model.norm.weight"] == 0.0


def test_a_frankenmerge_renumbers_the_layers_it_stacks():
    keys = {"a": keys_of(3), "b": keys_of(3)}
    plans, layers = plan_tensors(effective_config(cfg(FRANKEN), keys), keys)
    assert layers == 4
    by_out = {p.out_name: p.inputs for p in plans}
    assert by_out["model.layers.0.mlp.up_proj.weight"] == (("a", "model.layers.0.mlp.up_proj.weight"),)
    assert by_out["model.layers.1.mlp.up_proj.weight"] == (("a", "model.layers.1.mlp.up_proj.weight"),)
    assert by_out["model.layers.2.mlp.up_proj.weight"] == (("b", "model.layers.1.mlp.up_proj.weight"),)
    assert by_out["model.layers.3.mlp.up_proj.weight"] == (("b", "model.layers.2.mlp.up_proj.weight"),)
    assert by_out["model.embed_tokens.weight"] == (("a", "model.embed_tokens.weight"),)  # first slice's source
    assert by_out["model.norm.weight"] == (("b", "model.norm.weight"),)  # last slice's source
    assert len(plans) == 4 * 3 + 3


def test_the_examples_parse_with_their_dtypes():
    assert cfg(GRADIENT_SLERP).dtype == torch.float16
    assert cfg(FRANKEN).merge_method == "passthrough"
    assert not cfg(FRANKEN).from_models and cfg(TIES).from_models
    assert cfg(TIES).model_refs() == ["base", "x", "y", "z"]


def test_layer_numbers_are_found_in_common_naming_schemes():
    assert split_layer("model.layers.12.mlp.up_proj.weight") == ("model.layers.", 12, ".mlp.up_proj.weight")
    assert split_layer("transformer.h.3.attn.c_attn.weight") == ("transformer.h.", 3, ".attn.c_attn.weight")
    assert split_layer("model.embed_tokens.weight") is None


@pytest.mark.parametrize(("text", "key"), [
    ("merge_method: ties\nmodels: [{model: a}]\nmodules: {}", "modules"),
    ("merge_method: ties\nmodels: [{model: a}]\ntokenizer: {source: union}", "tokenizer"),
    ("merge_method: ties\nmodels: [{model: a}]\ntokenizer_source: union", "tokenizer_source"),
    ("merge_method: ties\nmodels: [{model: a}]\nchat_template: chatml", "chat_template"),
    ("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: base", "tokenizer_source"),
    ("merge_method: ties\nmodels: [{model: a}]\nmerge_metod: x", "merge_metod"),
    ("merge_method: ties\nmodels: [{model: a, parameter: {weight: 1}}]", "models[0].parameter"),
    ("merge_method: ties\nmodels: [{model: a+lora}]", "models[0].model"),
    ("merge_method: ties\nmodels: [{model: a}]\ndtype: float64", "dtype"),
    ("merge_method: ties\nmodels: [{model: a}]\nout_dtype: int8", "out_dtype"),
    ("merge_method: ties\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]",
     "models / slices"),
    ("models: [{model: a}]", "merge_method"),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [2, 1]}]}]",
     "slices[0].sources[0].layer_range"),
    ("merge_method: slerp\nslices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 3]}]}]",
     "slices[0].sources"),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 2]}], residual_weight: 0.5}]",
     "slices[0].residual_weight"),
    ("merge_method: ties\nmodels: [{model: a}]\nparameters: {weight: {value: 1}}", "parameters.weight"),
    ("merge_method: ties\nmodels: [{model: a}]\nparameters: {weight: [{filter: mlp, valeu: 1}]}",
     "parameters.weight[0].valeu"),
])
def test_what_cannot_be_honoured_is_refused_naming_its_key(text, key):
    with pytest.raises(MergeKitConfigError) as err:
        cfg(text)
    assert str(err.value).startswith(key + ":") or str(err.value).startswith(key + " ")
