"""The lm-eval task pool on local tasks and tiny random causal LMs: scores against log-likelihoods and greedy
generations computed here without lm-eval, offline refusals before work, and a whole run through the CLI."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from mergebench_core import PRETRAINED, Ensemble, hookimpl  # noqa: E402
from mergebench_core import registry as registry_module  # noqa: E402
from mergebench_core.cli import main  # noqa: E402
from mergebench_core.errors import ConfigError, MergebenchError  # noqa: E402
from mergebench_core.results.store import ResultStore  # noqa: E402
from mergebench_lmeval import CausalLMFolderPool, LmEvalParams, LmEvalTaskPool  # noqa: E402
from mergebench_lmeval.testing import (  # noqa: E402
    MC_DOCS, save_model, tiny_causal_lm, tiny_tokenizer, write_generation_task, write_multiple_choice_task)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def continuation_logprob(model, context: list[int], continuation: list[int]) -> float:
    """log P(continuation | context), summed over its tokens, from one forward pass."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
    return float(sum(logprobs[len(context) - 1 + j, tok] for j, tok in enumerate(continuation)))


def choice_scores(model, tokenizer, doc, prefix: list[int]) -> list[float]:
    context = prefix + tokenizer.encode(f"question : {doc['question']} answer :", add_special_tokens=False)
    return [continuation_logprob(model, context, tokenizer.encode(" " + c, add_special_tokens=False))
            for c in doc["choices"]]


def score(pool: LmEvalTaskPool, model, **kw):
    return pool.score_model(model, tasks=pool.tasks, limit=kw.get("limit"), device=CPU, batch_size=8, split="test")


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_multiple_choice_accuracy_is_the_share_of_documents_whose_gold_choice_is_most_likely(tmp_path, family):
    model, tokenizer = tiny_causal_lm(0, family), tiny_tokenizer()
    prefix = [tokenizer.bos_token_id] if family == "gemma" else []  # lm-eval puts BOS before Gemma's prompts
    docs, expect_norm = [], []
    for i, doc in enumerate(MC_DOCS):  # the gold choice is the model's favourite in even documents only
        scores = choice_scores(model, tokenizer, doc, prefix)
        best = max(range(len(scores)), key=scores.__getitem__)
        gold = best if i % 2 == 0 else (best + 1) % len(scores)
        docs.append({**doc, "gold": gold})
        normed = [s / len(c) for s, c in zip(scores, doc["choices"])]
        expect_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == gold))
    write_multiple_choice_task(tmp_path / "tasks", docs=docs)
    model.config._name_or_path = str(save_model(tmp_path / "m", 0, family))
    pool = LmEvalTaskPool(LmEvalParams(tasks=("tiny_mc",), include_path=str(tmp_path / "tasks")))
    row = score(pool, model)["tiny_mc"]
    n = len(docs)
    assert row["acc"] == pytest.approx(0.5) and row["examples"] == n
    assert row["acc_stderr"] == pytest.approx((0.25 * n / (n - 1) / n) ** 0.5)  # sample std / sqrt(n)
    assert row["acc_norm"] == pytest.approx(sum(expect_norm) / n)
    assert [s.name for s in pool.metrics("tiny_mc")] == ["acc", "acc_norm"]


def greedy(model, tokenizer, prompt: str, steps: int) -> str:
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_generation_exact_match_compares_greedy_continuations_with_targets(tmp_path):
    model, tokenizer = tiny_causal_lm(1), tiny_tokenizer()
    prompts = ["the cat sat", "what is the answer ?", "one two three", "the big dog"]
    generated = [greedy(model, tokenizer, p, 3) for p in prompts]
    docs = [{"prompt": p, "target": g if i < 3 else g + " mat"} for i, (p, g) in enumerate(zip(prompts, generated))]
    write_generation_task(tmp_path / "tasks", docs, max_gen_toks=3)
    model.config._name_or_path = str(save_model(tmp_path / "m", 1))
    pool = LmEvalTaskPool(LmEvalParams(tasks=("tiny_gen",), include_path=str(tmp_path / "tasks"), batch_size=1))
    row = score(pool, model)["tiny_gen"]
    assert pool.metrics("tiny_gen")[0].name == "exact_match,stripped"  # lm-eval's metric,filter key
    assert row["exact_match,stripped"] == pytest.approx(0.75) and row["examples"] == 4
    import random

    import numpy as np

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    limited = score(pool, model, limit=2)["tiny_gen"]
    assert limited["examples"] == 2 and limited["exact_match,stripped"] == 1.0
    after = (torch.rand(1), random.random(), np.random.rand())  # lm-eval reseeded them inside, and they were put back
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    assert after == (torch.rand(1), random.random(), np.random.rand())


def test_a_hub_task_offline_and_a_missing_local_file_are_named_before_work(tmp_path):
    tasks = tmp_path / "tasks"
    write_multiple_choice_task(tasks)
    (tasks / "hubtask.yaml").write_text(
        "task: hubtask\ndataset_path: someorg/some_data\ndataset_name: main\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    (tasks / "tiny_mc.jsonl").unlink()
    pool = LmEvalTaskPool(LmEvalParams(tasks=("tiny_mc", "hubtask"), include_path=str(tasks)))
    missing = pool.missing_resources()
    assert len(missing) == 2
    assert "tiny_mc" in missing[0] and "tiny_mc.jsonl" in missing[0]
    assert "hubtask" in missing[1] and "someorg/some_data (main) [test]" in missing[1]


def test_bad_selections_are_refused_with_the_fix(tmp_path):
    write_multiple_choice_task(tmp_path / "tasks")
    with pytest.raises(ConfigError, match="needs the lm-eval tasks"):
        LmEvalTaskPool(LmEvalParams())
    with pytest.raises(ConfigError, match="did you mean tiny_mc"):
        LmEvalTaskPool(LmEvalParams(tasks=("tiny_mcq",), include_path=str(tmp_path / "tasks"))).metrics("tiny_mcq")
    with pytest.raises(ConfigError, match="not a folder"):
        LmEvalTaskPool(LmEvalParams(tasks=("x",), include_path=str(tmp_path / "nowhere"))).metrics("x")
    with pytest.raises(ValueError, match="backend"):
        LmEvalParams(tasks=("x",), backend="onnx")
    pool = LmEvalTaskPool(LmEvalParams(tasks=("tiny_mc",), include_path=str(tmp_path / "tasks")))
    model = tiny_causal_lm()
    with pytest.raises(MergebenchError, match="one language model at a time"):
        pool.score_model(Ensemble([model, model]), tasks=["tiny_mc"], limit=None, device=CPU, batch_size=1,
                         split="test")
    with pytest.raises(MergebenchError, match="no 'val' split"):
        pool.score_model(model, tasks=["tiny_mc"], limit=None, device=CPU, batch_size=1, split="val")
    with pytest.raises(MergebenchError, match="causal language models"):
        pool.score_model(torch.nn.Linear(2, 2), tasks=["tiny_mc"], limit=None, device=CPU, batch_size=1,
                         split="test")
    with pytest.raises(MergebenchError, match="hands out no batches"):
        list(pool.batches("tiny_mc"))


def expert_folder(base: Path, out: Path, seed: int) -> Path:
    """An expert: the pretrained tiny model nudged by a seeded random direction, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture()
def tiny_lm_plugin(monkeypatch, tmp_path):
    base = save_model(tmp_path / "pretrained")
    experts = {"tiny_mc": expert_folder(base, tmp_path / "mc", 1), "tiny_gen": expert_folder(base, tmp_path / "gen", 2)}
    module = types.ModuleType("tiny_lm_pool")

    @hookimpl
    def register_modelpools(register):
        register("tiny-lm", lambda: CausalLMFolderPool(base, experts, name="tiny-lm"), "two tiny LM experts")

    module.register_modelpools = register_modelpools
    monkeypatch.setattr(registry_module, "_REGISTRY", registry_module.build_registry(extra_modules=[module]))
    monkeypatch.setenv("MERGEBENCH_STORE", str(tmp_path / "r.sqlite"))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    tasks = tmp_path / "tasks"
    write_multiple_choice_task(tasks)
    write_generation_task(tasks, [{"prompt": "the cat", "target": "sat"}, {"prompt": "the dog", "target": "ran"}])
    return tasks


def test_a_merge_of_causal_lms_is_scored_by_lm_eval_and_stored_per_task(tiny_lm_plugin, tmp_path):
    taskpool = f"lmeval(tasks=tiny_mc,tiny_gen,include_path={tiny_lm_plugin})"
    assert main(["run", "-m", "task_arithmetic", "-p", "tiny-lm", "--taskpool", taskpool]) == 0
    rows = ResultStore(tmp_path / "r.sqlite").all()
    assert {r.method for r in rows} >= {"task_arithmetic", "pretrained", "individual"}
    assert all(r.status == "ok" for r in rows), [(r.method, r.error) for r in rows]
    assert {r.taskpool for r in rows} == {f"lmeval(include_path={tiny_lm_plugin},tasks=[tiny_mc,tiny_gen])"}
    merged = next(r for r in rows if r.method == "task_arithmetic")
    assert set(merged.metrics) == {"tiny_mc", "tiny_gen"}
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "examples"} <= set(merged.metrics["tiny_mc"])
    assert merged.primary_metrics["tiny_gen"] == {"metric": "exact_match,stripped", "higher_is_better": True}
    assert merged.mean == pytest.approx((merged.metrics["tiny_mc"]["acc"] +
                                         merged.metrics["tiny_gen"]["exact_match,stripped"]) / 2)


def test_an_offline_run_naming_a_hub_task_stops_before_any_work(tiny_lm_plugin, tmp_path, capsys):
    (tiny_lm_plugin / "hubtask.yaml").write_text(
        "task: hubtask\ndataset_path: someorg/some_data\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    code = main(["run", "-m", "task_arithmetic", "-p", "tiny-lm", "--taskpool",
                 f"lmeval(tasks=tiny_mc,tiny_gen,hubtask,include_path={tiny_lm_plugin})"])
    assert code != 0
    assert "someorg/some_data" in capsys.readouterr().err
    assert not (tmp_path / "r.sqlite").exists() or not ResultStore(tmp_path / "r.sqlite").all()


def test_the_vllm_backend_gets_the_merged_model_and_its_tokenizer_saved_to_a_folder(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergebench_lmeval.wrapper import language_model

    seen = {}

    class FakeVLLM:  # stands in for lm-eval's VLLM, which loads models from a folder only
        def __init__(self, pretrained, batch_size, **kwargs):
            seen["model"] = AutoModelForCausalLM.from_pretrained(pretrained)
            seen["tokenizer"] = AutoTokenizer.from_pretrained(pretrained)
            seen["batch_size"], seen["kwargs"] = batch_size, kwargs

    monkeypatch.setitem(__import__("sys").modules, "lm_eval.models.vllm_causallms",
                        types.SimpleNamespace(VLLM=FakeVLLM))
    model = tiny_causal_lm(3)
    model.config._name_or_path = str(save_model(tmp_path / "m", 0))  # the tokenizer's folder; other weights
    lm = language_model(model, LmEvalParams(tasks=("x",), backend="vllm", batch_size=4, max_length=32), CPU)
    assert isinstance(lm, FakeVLLM) and seen["batch_size"] == 4 and seen["kwargs"] == {"max_length": 32}
    for key, value in model.state_dict().items():
        assert torch.equal(seen["model"].state_dict()[key], value), key
    assert seen["tokenizer"].encode("the cat sat", add_special_tokens=False) == \
        tiny_tokenizer().encode("the cat sat", add_special_tokens=False)


def test_the_vllm_backend_without_vllm_says_how_to_get_it(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from mergebench_lmeval.wrapper import language_model

    model = tiny_causal_lm()
    model.config._name_or_path = str(save_model(tmp_path / "m"))
    with pytest.raises(MergebenchError, match=r"needs vLLM .*lm-eval\[vllm\]"):
        language_model(model, LmEvalParams(tasks=("x",), backend="vllm"), CPU)


def test_the_folder_pool_loads_each_model_and_names_what_is_wrong(tmp_path):
    base = save_model(tmp_path / "pretrained")
    expert = expert_folder(base, tmp_path / "mc", 1)
    pool = CausalLMFolderPool(base, {"tiny_mc": expert}, name="tiny")
    assert pool.expert_names == ["tiny_mc"]
    before = pool.identity("tiny_mc")
    loaded = pool.load_model("tiny_mc")
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config._name_or_path == str(expert)
    assert not torch.equal(loaded.lm_head.weight, pool.load_model(PRETRAINED).lm_head.weight)
    expert_folder(base, expert, 2)  # saved again: other weights, another identity (statistics are keyed by it)
    assert pool.identity("tiny_mc") != before
    with pytest.raises(MergebenchError, match="no config.json"):
        CausalLMFolderPool(base, {"t": tmp_path / "empty"})
    with pytest.raises(KeyError, match="has no model 'other'"):
        pool.load_model("other")


def test_a_model_that_does_not_say_where_its_tokenizer_is_is_refused_with_the_fix():
    from mergebench_lmeval.wrapper import tokenizer_source

    model = tiny_causal_lm()
    model.config._name_or_path = ""
    with pytest.raises(MergebenchError, match=r"lmeval\(tokenizer=FOLDER_OR_HUB_ID\)"):
        tokenizer_source(model)
    assert tokenizer_source(model, "some/folder") == "some/folder"


def test_a_lora_adapter_expert_is_the_base_with_its_scaled_delta_merged_in(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = save_model(tmp_path / "pretrained")
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        adapted = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), config)
    adapted.save_pretrained(tmp_path / "adapter")
    pool = CausalLMFolderPool(base, {"tiny_mc": tmp_path / "adapter"})
    expert, pretrained = pool.load_model("tiny_mc").state_dict(), pool.load_model(PRETRAINED).state_dict()
    lora = {k: v for k, v in adapted.state_dict().items() if "lora_" in k}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            stem = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            a, b = lora[f"{stem}.lora_A.default.weight"], lora[f"{stem}.lora_B.default.weight"]
            key = f"model.layers.{layer}.self_attn.{proj}.weight"
            assert torch.allclose(expert[key], pretrained[key] + (6 / 2) * b @ a, atol=1e-6), key
    unadapted = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(expert[unadapted], pretrained[unadapted])
    assert "lora_" not in " ".join(expert)


def test_factored_task_arithmetic_writes_one_adapter_whose_delta_is_the_weighted_sum(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from mergebench_lmeval.lora_factored import task_arithmetic_adapter

    base = save_model(tmp_path / "pretrained")
    recipes = [(2, 6.0, ["q_proj", "v_proj"]), (3, 3.0, ["q_proj", "k_proj"])]
    folders, deltas = [], []
    for i, (r, alpha, targets) in enumerate(recipes):
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        with torch.random.fork_rng():
            torch.manual_seed(10 + i)
            adapted = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), config)
        adapted.save_pretrained(tmp_path / f"adapter{i}")
        folders.append(tmp_path / f"adapter{i}")
        sd = adapted.state_dict()
        deltas.append({f"model.layers.{layer}.self_attn.{proj}.weight":
                       (alpha / r) * sd[f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_B.default.weight"]
                       @ sd[f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_A.default.weight"]
                       for layer in range(2) for proj in targets})
    out = task_arithmetic_adapter(folders, tmp_path / "merged", weights=[0.5, 0.3])
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 5
    merged = CausalLMFolderPool(base, {"merged": out}).load_model("merged").state_dict()
    pretrained = AutoModelForCausalLM.from_pretrained(str(base)).state_dict()
    for key in pretrained:
        expected = pretrained[key] + 0.5 * deltas[0].get(key, 0) + 0.3 * deltas[1].get(key, 0)
        assert torch.allclose(merged[key], expected, atol=1e-6), key
    with pytest.raises(MergebenchError, match="2 weights for 1 adapters"):
        task_arithmetic_adapter(folders[:1], tmp_path / "x", weights=[1.0, 2.0])


def lora_adapter(base: Path, out: Path, seed: int, r: int = 2, alpha: float = 4.0) -> tuple[Path, dict]:
    """A random LoRA adapter of `base` on q_proj and v_proj, and its materialised deltas {weight name: ΔW}."""
    import peft
    from transformers import AutoModelForCausalLM

    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        adapted = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), config)
    adapted.save_pretrained(out)
    sd = adapted.state_dict()
    stem = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.default.weight"
    return out, {f"model.layers.{layer}.self_attn.{p}.weight":
                 (alpha / r) * sd[stem.format(layer, p, "B")] @ sd[stem.format(layer, p, "A")]
                 for layer in range(2) for p in ("q_proj", "v_proj")}


def test_lora_task_arithmetic_merges_factors_into_an_adapter_equal_to_task_arithmetic(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from mergebench_core import RunContext
    from mergebench_lmeval import LoraTaskArithmetic

    base = save_model(tmp_path / "pretrained")
    (mc, d_mc), (gen, d_gen) = lora_adapter(base, tmp_path / "mc", 1), lora_adapter(base, tmp_path / "gen", 2, r=3)
    pool = CausalLMFolderPool(base, {"tiny_mc": mc, "tiny_gen": gen}, name="tiny-lora")
    assert LoraTaskArithmetic.refusal(pool, LoraTaskArithmetic.Params()) is None
    whole = CausalLMFolderPool(base, {"tiny_mc": expert_folder(base, tmp_path / "whole", 1)})
    assert "not all peft LoRA adapters" in LoraTaskArithmetic.refusal(whole, LoraTaskArithmetic.Params())
    out = LoraTaskArithmetic(LoraTaskArithmetic.Params(scaling_factor=0.4)).run(
        pool, RunContext(cache_dir=tmp_path / "cache"))
    merged, pretrained = out.model.state_dict(), pool.load_model(PRETRAINED).state_dict()
    for key in pretrained:
        expected = pretrained[key] + 0.4 * (d_mc.get(key, 0) + d_gen.get(key, 0))
        assert torch.allclose(merged[key], expected, atol=1e-6), key
    adapter = json.loads((Path(out.extras["adapter"]) / "adapter_config.json").read_text())
    assert adapter["r"] == 5 and adapter["lora_alpha"] == 5  # ranks stacked, the merged scaling 1


def test_lora_task_arithmetic_runs_in_the_grid_and_scores_like_task_arithmetic(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    base = save_model(tmp_path / "pretrained")
    experts = {"tiny_mc": lora_adapter(base, tmp_path / "mc", 1)[0], "tiny_gen": lora_adapter(base, tmp_path / "g", 2)[0]}
    module = types.ModuleType("tiny_lora_pool")

    @hookimpl
    def register_modelpools(register):
        register("tiny-lora", lambda: CausalLMFolderPool(base, experts, name="tiny-lora"), "two LoRA experts")

    module.register_modelpools = register_modelpools
    monkeypatch.setattr(registry_module, "_REGISTRY", registry_module.build_registry(extra_modules=[module]))
    monkeypatch.setenv("MERGEBENCH_STORE", str(tmp_path / "r.sqlite"))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    tasks = tmp_path / "tasks"
    write_multiple_choice_task(tasks)
    write_generation_task(tasks, [{"prompt": "the cat", "target": "sat"}, {"prompt": "the dog", "target": "ran"}])
    assert main(["run", "-m", "lora_task_arithmetic,task_arithmetic", "-p", "tiny-lora", "--taskpool",
                 f"lmeval(tasks=tiny_mc,tiny_gen,include_path={tasks})"]) == 0
    rows = {r.method: r for r in ResultStore(tmp_path / "r.sqlite").all()}
    assert rows["lora_task_arithmetic"].status == "ok", rows["lora_task_arithmetic"].error
    assert Path(rows["lora_task_arithmetic"].extras["adapter"], "adapter_model.safetensors").is_file()
    for task, metric in (("tiny_mc", "acc"), ("tiny_gen", "exact_match,stripped")):
        assert rows["lora_task_arithmetic"].metrics[task][metric] == rows["task_arithmetic"].metrics[task][metric]
