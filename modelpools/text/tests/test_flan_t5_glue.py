"""Flan-T5 on GLUE, offline: tiny T5 models taught the label words for a few steps, under the real hub ids (full
fine-tuning and peft LoRA adapters); `mergebench run --method ties` on both pools reproduces FusionBench's scoring
done independently with transformers and peft (greedy generation of at most 10 tokens, exact match of the decoded
text, Spearman correlation of the generated STS-B scores by scipy)."""

from __future__ import annotations

import math

import pytest
import torch
from mergebench_text_tasks.catalog import FLAN_T5_PROMPTS
from mergebench_text_tasks.testing import build_t5_world

from mergebench_core import PRETRAINED
from mergebench_core.cli import main
from mergebench_core.engine.merging import merge_sources
from mergebench_core.results.store import ResultStore
from mergebench_core.engine.tensors import StateDictSource

BASE = "google/flan-t5-base"
FAST = {"n_train": 16, "base_steps": 30, "expert_steps": 20}


@pytest.fixture(scope="module")
def full_world(tmp_path_factory):
    import datasets

    datasets.disable_progress_bars()
    return build_t5_world(tmp_path_factory.mktemp("t5-world"), **FAST)


@pytest.fixture(scope="module")
def lora_world(tmp_path_factory):
    import datasets

    datasets.disable_progress_bars()
    return build_t5_world(tmp_path_factory.mktemp("t5-lora-world"), lora=True, **FAST)


def _env(world, tmp_path, monkeypatch, plugins: str = "text,text_tasks,ties"):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(world.hub_cache))
    monkeypatch.setenv("MERGEBENCH_TEXT_DATA_DIR", str(world.data_dir))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEBENCH_PLUGINS", plugins)
    from mergebench_core.contract import registry

    monkeypatch.setattr(registry, "_REGISTRY", None)
    return tmp_path


class IndependentFlanT5:
    """FusionBench's `evaluate_accuracy` / `evaluate_spearman_rho` with transformers alone: prompts tokenized with
    padding to max_length (512) and truncation, greedy `generate(..., max_length=10)` (attention mask from the
    padding), decoded without special tokens, compared with the decoded target text; STS-B: floats parsed (0.0 when
    unparsable), scipy's spearmanr."""

    def __init__(self, world):
        from transformers import AutoTokenizer

        self.world = world
        self.tok = AutoTokenizer.from_pretrained(world.snapshot(BASE))

    @torch.no_grad()
    def metrics(self, model, tasks) -> dict[str, dict[str, float]]:
        from datasets import load_from_disk
        from scipy.stats import spearmanr

        out = {}
        for t in tasks:
            spec, prompt = self.world.suite.tasks[t], FLAN_T5_PROMPTS[t]
            rows = load_from_disk(str(self.world.data_dir / spec.dataset / spec.config / spec.test_split))
            texts = [prompt.template.format(**{f: r[f] for f in spec.text_fields}) for r in rows]
            enc = self.tok(texts, padding="max_length", truncation=True, max_length=512, return_tensors="pt")
            # FusionBench calls generate(input_ids, max_length=10); the transformers 4 it ran on inferred the
            # attention mask from the pad tokens, which transformers 5 no longer does for encoder-decoders
            generated = self.tok.batch_decode(model.eval().generate(enc["input_ids"], attention_mask=enc[
                "attention_mask"], max_length=10), skip_special_tokens=True)
            targets = [self.tok.decode(self.tok(prompt.answer(r["label"]))["input_ids"], skip_special_tokens=True)
                       for r in rows]
            if spec.regression:
                def parse(s: str) -> float:
                    try:
                        return float(s)
                    except ValueError:
                        return 0.0
                rho = spearmanr([parse(g) for g in generated], [parse(x) for x in targets])[0]
                out[t] = {"spearman": 0.0 if math.isnan(rho) else float(rho)}
            else:
                out[t] = {"accuracy": sum(g == x for g, x in zip(generated, targets)) / len(rows)}
            out[t]["examples"] = float(len(rows))
        return out


def _check(stored, expected) -> None:
    for t, m in expected.items():
        assert stored[t]["examples"] == m["examples"], t
        for k in ("accuracy", "spearman"):
            if k in m:
                assert stored[t][k] == pytest.approx(m[k], abs=1e-9), (t, k, stored[t], m)


def _t5(world, repo: str):
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration.from_pretrained(world.snapshot(repo)).eval()


def _lora_expert(world, task: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(_t5(world, BASE), world.snapshot(world.suite.experts[task])).merge_and_unload()


def _once(model) -> dict[str, torch.Tensor]:
    """The state dict with each tied parameter once (T5's embeddings are one parameter under three names)."""
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in names}


def _ties_check(world, rows, experts) -> None:
    from mergebench_ties import Ties

    reference = IndependentFlanT5(world)
    base = _t5(world, BASE)
    _check(rows["pretrained"].metrics, reference.metrics(base, world.tasks))
    for t in world.tasks:
        _check({t: rows["individual"].metrics[t]}, reference.metrics(experts[t], [t]))
    merged: dict[str, torch.Tensor] = {}
    merge_sources(Ties(), StateDictSource(_once(base), "base"),
                  [StateDictSource(_once(experts[t]), t) for t in world.tasks], sink=merged)
    model = _t5(world, BASE)
    missing, unexpected = model.load_state_dict(merged, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                               "lm_head.weight"}
    _check(rows["ties"].metrics, reference.metrics(model, world.tasks))


def _run(tmp, pool: str, capsys, *extra: str) -> dict:
    store_path = tmp / "results.sqlite"
    code = main(["run", "--method", "ties", "--modelpool", pool, "--store", str(store_path), *extra])
    assert code == 0, capsys.readouterr().err
    rows = {r.method: r for r in ResultStore(store_path).all()}
    assert all(r.status == "ok" for r in rows.values()), [r.error for r in rows.values()]
    return rows


def test_ties_on_flan_t5_glue_matches_fusionbench_generation_scoring(full_world, tmp_path, monkeypatch, capsys):
    tmp = _env(full_world, tmp_path, monkeypatch)
    rows = _run(tmp, "flan-t5-base_glue", capsys)
    assert rows["ties"].primary_metrics["stsb"]["metric"] == "spearman"
    assert rows["ties"].primary_metrics["cola"]["metric"] == "accuracy"
    individual = rows["individual"].metrics
    assert any(individual[t]["accuracy"] > 0 for t in full_world.tasks if t != "stsb")  # label words are generated
    _ties_check(full_world, rows, {t: _t5(full_world, full_world.suite.experts[t]) for t in full_world.tasks})


def test_ties_on_flan_t5_lora16_merges_peft_deltas(lora_world, tmp_path, monkeypatch, capsys):
    from mergebench_text import TextModelPool

    tmp = _env(lora_world, tmp_path, monkeypatch)
    rows = _run(tmp, "flan-t5-base_glue-lora16", capsys)
    experts = {t: _lora_expert(lora_world, t) for t in lora_world.tasks}
    _ties_check(lora_world, rows, experts)
    pool = TextModelPool("flan-t5-base_glue-lora16")  # the task vector lives on the adapted layers only
    base, cola = pool.state_dict(PRETRAINED), pool.state_dict("cola")
    changed = {k for k in base if not torch.equal(base[k], cola[k])}
    assert changed and all(k.endswith(("SelfAttention.q.weight", "SelfAttention.v.weight",
                                       "EncDecAttention.q.weight", "EncDecAttention.v.weight")) for k in changed)
    assert "+google/flan-t5-base@" in pool.identity("cola")


def test_knots_merges_the_lora16_pool_in_factored_form_equal_to_the_dense_merge(lora_world, tmp_path, monkeypatch,
                                                                               capsys):
    """KnOTS on `flan-t5-base_glue-lora16` reads each expert's adapter factors (`adapter_folder`) and writes a merged
    adapter, never a full-size update; its stored scores are those of KnOTS on the dense task vectors."""
    pytest.importorskip("mergebench_knots")
    pytest.importorskip("mergebench_lmeval")
    from mergebench_knots import Params, knots_adapter, knots_task_vectors
    from mergebench_text import TextModelPool

    tmp = _env(lora_world, tmp_path, monkeypatch, "text,text_tasks,knots,lmeval,task_arithmetic")
    store_path = tmp / "results.sqlite"
    code = main(["run", "--method", "knots,lora_task_arithmetic,task_arithmetic", "--modelpool",
                 "flan-t5-base_glue-lora16", "--store", str(store_path)])
    assert code == 0, capsys.readouterr().err
    rows = {r.method: r for r in ResultStore(store_path).all()}
    assert all(r.status == "ok" for r in rows.values()), {m: r.error for m, r in rows.items()}
    assert rows["knots"].extras["form"] == "factored" and "adapter" in rows["lora_task_arithmetic"].extras
    _check(rows["lora_task_arithmetic"].metrics, rows["task_arithmetic"].metrics)  # the same merge, factored

    pool = TextModelPool("flan-t5-base_glue-lora16")
    assert pool.adapter_folder(PRETRAINED) is None and pool.adapter_folder("cola").is_dir()
    base = _once(_t5(lora_world, BASE))
    experts = [_once(_lora_expert(lora_world, t)) for t in lora_world.tasks]
    linear = {k for k, v in base.items() if k.endswith(".weight") and v.ndim == 2 and "embed" not in k
              and k != "lm_head.weight"}
    params = Params()
    updates = knots_task_vectors(base, experts, linear, params)
    assert updates and all(k.endswith(("q.weight", "v.weight")) for k in updates)
    model = _t5(lora_world, BASE)
    state = {k: v + params.scaling_factor * updates[k] if k in updates else v for k, v in base.items()}
    model.load_state_dict(state, strict=False)
    dense = IndependentFlanT5(lora_world).metrics(model, lora_world.tasks)
    _check(rows["knots"].metrics, dense)  # generation scores: coarse, so the weights are compared too
    folders = [pool.adapter_folder(t) for t in lora_world.tasks]
    factored = _once(pool.with_adapter(knots_adapter(folders, tmp / "knots-adapter", params)))
    for k, v in state.items():
        assert torch.allclose(factored[k], v, atol=1e-5), k


def test_full_pool_reads_tied_embeddings_lazily(full_world, tmp_path, monkeypatch):
    from mergebench_text import TextModelPool

    _env(full_world, tmp_path, monkeypatch)
    pool = TextModelPool("flan-t5-base_glue")
    reference = _once(_t5(full_world, "tanganke/flan-t5-base_glue-rte"))
    src = pool.tensor_source("rte")
    assert src.keys() == list(reference)
    assert all(torch.equal(src.get(k), reference[k]) for k in reference)


def test_differentiable_scores_are_label_word_likelihoods(full_world, tmp_path, monkeypatch):
    from mergebench_text_tasks.generation import Seq2SeqGenerationTaskPool

    _env(full_world, tmp_path, monkeypatch)
    pool = Seq2SeqGenerationTaskPool("flan-t5-base_glue", tasks=["mnli", "stsb"])
    model = _t5(full_world, "tanganke/flan-t5-base_glue-mnli")
    x, _ = next(iter(pool.batches("mnli", "test", batch_size=3)))
    scores = pool.logits(model, "mnli", x)
    assert scores.shape == (3, 4) and scores.requires_grad
    for i in range(3):
        ids = x[i][x[i] >= 0][None]
        for c, word in enumerate(("entailment", "neutral", "contradiction")):
            target = pool.tokenizer(word, return_tensors="pt")["input_ids"]
            nll = model(input_ids=ids, labels=target).loss * target.shape[1]
            assert float(scores[i, c].detach()) == pytest.approx(-float(nll.detach()), abs=1e-4)
    assert torch.allclose(scores.exp().sum(-1), torch.ones(3), atol=1e-5)
    with torch.inference_mode():
        hard = pool.logits(model, "mnli", x)
    assert set(hard.sum(-1).tolist()) == {1.0} and hard.shape == (3, 4)  # one outcome each, "none" included
    xs, ys = next(iter(pool.batches("stsb", "test", batch_size=4)))
    assert ys.dtype == torch.float32 and all(float(f"{v:.1f}") == pytest.approx(float(v)) for v in ys)
    assert pool.logits(model, "stsb", xs).shape == (4, 52)


DATA_METHODS = {
    "regmean": ["regmean.n_examples=4"],
    "regmean_pp": ["regmean_pp.n_examples=4"],
    "fisher": ["fisher.n_examples=3"],
    "gradient_matching": ["gradient_matching.n_examples=3"],
    "adamerging_lw": ["adamerging_lw.steps=2", "adamerging_lw.batch_size=2"],
}


def test_data_dependent_methods_run_on_t5(full_world, tmp_path, monkeypatch, capsys):
    plugins = "text,text_tasks,regmean,regmean_pp,fisher,gradient_matching,adamerging"
    tmp = _env(full_world, tmp_path, monkeypatch, plugins)
    store_path = tmp / "results.sqlite"
    code = main(["run", "--method", ",".join(DATA_METHODS), "--modelpool", "flan-t5-base_glue", "--tasks",
                 "rte,stsb", "--store", str(store_path), *[o for v in DATA_METHODS.values() for o in v]])
    assert code == 0, capsys.readouterr().err
    rows = {r.method: r for r in ResultStore(store_path).all() if r.kind == "method"}
    assert set(rows) == set(DATA_METHODS)
    assert all(r.status == "ok" for r in rows.values()), {m: r.error for m, r in rows.items()}
    assert "decoder.block.1.layer.1.EncDecAttention.q.weight" in rows["regmean"].extras["regressed"]


def test_tied_embeddings_are_one_tensor_of_the_state_dict(full_world, tmp_path, monkeypatch):
    from mergebench_text import TextModelPool

    _env(full_world, tmp_path, monkeypatch)
    model = TextModelPool("flan-t5-base_glue").load_model("rte")
    state = model.state_dict()
    assert "shared.weight" in state and "encoder.embed_tokens.weight" not in state
    shifted = {k: v + 1 for k, v in state.items()}
    model.load_state_dict(shifted)  # strict: the tied names are filled from the one given
    assert torch.equal(model.encoder.embed_tokens.weight, shifted["shared.weight"])
    assert torch.equal(model.decoder.embed_tokens.weight, shifted["shared.weight"])
