"""The GPT-2 GLUE pool end to end, offline: tiny random GPT-2 models under the real hub ids, tiny GLUE stand-ins in the
documented data override, `mergebench run --method ties --modelpool gpt2_glue`, and the stored scores checked against
an independent computation with plain transformers, FusionBench's way (each expert's GPT2ForSequenceClassification
with the merged body swapped in, inputs padded to 512 tokens)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mergebench_text_tasks.testing import build_gpt2_world

from mergebench_core import PRETRAINED
from mergebench_core.cli import main
from mergebench_core.engine.merging import merge_sources
from mergebench_core.results.store import ResultStore
from mergebench_core.engine.tensors import StateDictSource

BASE = "gpt2"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import datasets

    datasets.disable_progress_bars()
    return build_gpt2_world(tmp_path_factory.mktemp("gpt2-world"))


@pytest.fixture()
def offline_env(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(world.hub_cache))
    monkeypatch.setenv("MERGEBENCH_TEXT_DATA_DIR", str(world.data_dir))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEBENCH_PLUGINS", "text,text_tasks,ties")
    from mergebench_core.contract import registry

    monkeypatch.setattr(registry, "_REGISTRY", None)
    return tmp_path


class IndependentGPT2Glue:
    """FusionBench's scoring with transformers alone: GPT2Tokenizer with model_max_length 512 and the unk token as
    pad token, `padding="max_length", truncation=True`, each expert's GPT2ForSequenceClassification with the body to
    score loaded into `.transformer`, accuracy and mean cross-entropy (and Matthews correlation by scikit-learn)."""

    def __init__(self, world):
        from transformers import AutoTokenizer

        self.world = world
        self.tok = AutoTokenizer.from_pretrained(world.snapshot(BASE))
        self.tok.model_max_length = 512
        self.tok.pad_token = self.tok.unk_token or self.tok.eos_token

    @torch.no_grad()
    def metrics(self, body: dict[str, torch.Tensor], tasks: list[str]) -> dict[str, dict[str, float]]:
        from datasets import load_from_disk
        from sklearn.metrics import matthews_corrcoef
        from transformers import GPT2ForSequenceClassification

        out = {}
        for t in tasks:
            spec = self.world.suite.tasks[t]
            rows = load_from_disk(str(self.world.data_dir / spec.dataset / spec.config / spec.test_split))
            enc = self.tok(*[list(rows[f]) for f in spec.text_fields], padding="max_length", truncation=True,
                           return_tensors="pt")
            assert enc["input_ids"].shape[1] == 512
            clf = GPT2ForSequenceClassification.from_pretrained(self.world.snapshot(self.world.suite.experts[t]))
            clf.transformer.load_state_dict(body)
            logits = clf.eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            labels = torch.tensor(list(rows["label"]))
            out[t] = {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
                      "loss": float(F.cross_entropy(logits, labels)), "examples": float(len(labels))}
            if t == "cola":
                out[t]["matthews_corrcoef"] = float(matthews_corrcoef(labels.numpy(), logits.argmax(-1).numpy()))
        return out


def _body(world, repo: str) -> dict[str, torch.Tensor]:
    from transformers import GPT2Model

    return GPT2Model.from_pretrained(world.snapshot(repo)).state_dict()


def _check(stored: dict[str, dict[str, float]], expected: dict[str, dict[str, float]]) -> None:
    for t, m in expected.items():
        assert stored[t]["examples"] == m["examples"], t
        assert stored[t]["accuracy"] == pytest.approx(m["accuracy"]), (t, stored[t], m)
        assert math.isclose(stored[t]["loss"], m["loss"], rel_tol=1e-4, abs_tol=1e-4), (t, stored[t], m)
        if "matthews_corrcoef" in m:
            assert stored[t]["matthews_corrcoef"] == pytest.approx(m["matthews_corrcoef"], abs=1e-9), t


def test_ties_on_gpt2_glue_offline_matches_independent_transformers(world, offline_env, capsys):
    from mergebench_ties import Ties

    store_path = offline_env / "results.sqlite"
    code = main(["run", "--method", "ties", "--modelpool", "gpt2_glue", "--store", str(store_path)])
    assert code == 0, capsys.readouterr().err
    rows = {r.method: r for r in ResultStore(store_path).all()}
    assert {"pretrained", "individual", "ties"} <= set(rows)
    assert all(r.status == "ok" for r in rows.values()), [r.error for r in rows.values()]
    assert rows["ties"].primary_metrics["cola"]["metric"] == "accuracy"  # FusionBench's CoLA number is accuracy

    reference = IndependentGPT2Glue(world)
    base = _body(world, BASE)
    experts = {t: _body(world, world.suite.experts[t]) for t in world.tasks}
    _check(rows["pretrained"].metrics, reference.metrics(base, world.tasks))
    for t in world.tasks:
        _check({t: rows["individual"].metrics[t]}, reference.metrics(experts[t], [t]))
    merged: dict[str, torch.Tensor] = {}
    merge_sources(Ties(), StateDictSource(base, "base"), [StateDictSource(experts[t], t) for t in world.tasks],
                  sink=merged)
    _check(rows["ties"].metrics, reference.metrics(merged, world.tasks))
    assert rows["ties"].metrics != rows["pretrained"].metrics


def test_offline_run_with_empty_cache_lists_every_missing_resource(offline_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(offline_env / "empty-hub"))
    monkeypatch.setenv("MERGEBENCH_TEXT_DATA_DIR", str(offline_env / "no-data"))
    store_path = offline_env / "results.sqlite"
    code = main(["run", "--method", "ties", "--modelpool", "gpt2_glue", "--store", str(store_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "model gpt2\n" in err
    for t in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2"):
        assert f"model tanganke/gpt2_{t}" in err
        split = "validation_matched" if t == "mnli" else "validation"
        assert f"dataset nyu-mll/glue ({t}) [{split}]" in err
    assert "15 resource(s)" in err  # 8 models and 7 datasets, each named once
    assert "mergebench download --modelpool gpt2_glue" in err
    assert not store_path.exists() or ResultStore(store_path).all() == []


def test_pool_reads_the_body_lazily_under_module_names(world, offline_env):
    from mergebench_text import TextModelPool

    pool = TextModelPool("gpt2_glue")
    for name, repo in ((PRETRAINED, BASE), ("mrpc", "tanganke/gpt2_mrpc")):
        reference = _body(world, repo)
        src = pool.tensor_source(name)
        assert src.keys() == list(reference)  # experts store it under transformer.*, the base bare
        for k in reference:
            assert torch.equal(src.get(k), reference[k]), (name, k)
    assert pool.identity("mrpc") == "tanganke/gpt2_mrpc@0123456789abcdef0123456789abcdef01234567"
    bf16 = TextModelPool("gpt2_glue", dtype="bfloat16").load_model("cola")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_truncation_length_and_batch_size_are_task_pool_parameters(world, offline_env):
    from datasets import load_from_disk
    from mergebench_text_tasks import TextClassificationTaskPool
    from transformers import AutoTokenizer

    pool = TextClassificationTaskPool("gpt2_glue", tasks=["mrpc"], max_length=12, batch_size=4)
    batches = list(pool.batches("mrpc", "test", batch_size=256))
    assert [x.shape for x, _ in batches] == [(4, 12), (4, 12), (2, 12)]  # capped at 4, padded to 12
    rows = load_from_disk(str(world.data_dir / "nyu-mll/glue/mrpc/validation"))
    tok = AutoTokenizer.from_pretrained(world.snapshot(BASE))
    expected = tok(list(rows["sentence1"]), list(rows["sentence2"]), truncation=True, max_length=12)["input_ids"]
    inputs = torch.cat([x for x, _ in batches])
    for row, ids in zip(inputs, expected):
        assert row[:len(ids)].tolist() == ids and (row[len(ids):] == -1).all()
    assert torch.equal(torch.cat([y for _, y in batches]), torch.tensor(list(rows["label"])))
    assert pool.num_examples("mrpc") == 10
    val = list(pool.batches("mrpc", "val"))  # the core's 10 % of train (24 examples: 2)
    assert sum(len(y) for _, y in val) == 2


DATA_METHODS = {  # small settings: the point is that each runs on GPT-2's Conv1D layers, not its accuracy
    "regmean": ["regmean.n_examples=8"],
    "regmean_pp": ["regmean_pp.n_examples=8"],
    "fisher": ["fisher.n_examples=6"],
    "gradient_matching": ["gradient_matching.n_examples=6"],
    "adamerging_lw": ["adamerging_lw.steps=2", "adamerging_lw.batch_size=4"],
}


def test_data_dependent_methods_run_on_gpt2_conv1d_layers(world, offline_env, monkeypatch, capsys):
    monkeypatch.setenv("MERGEBENCH_PLUGINS", "text,text_tasks,regmean,regmean_pp,fisher,gradient_matching,adamerging")
    store_path = offline_env / "results.sqlite"
    overrides = [o for v in DATA_METHODS.values() for o in v]
    code = main(["run", "--method", ",".join(DATA_METHODS), "--modelpool", "gpt2_glue", "--tasks", "cola,mrpc",
                 "--store", str(store_path), *overrides])
    assert code == 0, capsys.readouterr().err
    rows = {r.method: r for r in ResultStore(store_path).all() if r.kind == "method"}
    assert set(rows) == set(DATA_METHODS)
    assert all(r.status == "ok" for r in rows.values()), {m: r.error for m, r in rows.items()}
    conv1d = {f"h.{i}.{layer}.weight" for i in range(2) for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                       "mlp.c_proj")}
    assert conv1d <= set(rows["regmean"].extras["regressed"])
    assert conv1d <= set(rows["regmean_pp"].extras["regressed_in_order"])
    for r in rows.values():
        assert set(r.metrics) == {"cola", "mrpc"}
