"""RoBERTa-base with the four textattack experts, offline: both head modes reproduce an independent transformers
computation, and each expert's output order is read from its config, its model card or the catalog."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mergebench_text_tasks.testing import build_roberta_world

from mergebench_core import PRETRAINED
from mergebench_core.cli import main
from mergebench_core.engine.merging import merge_sources
from mergebench_core.results.store import ResultStore
from mergebench_core.engine.tensors import StateDictSource

BASE = "FacebookAI/roberta-base"
# ag_news names its labels in its config, in another order than the dataset's; imdb's card pairs outputs and labels;
# MNLI names nothing (the catalog's TextAttack order applies); MRPC names nothing (the dataset's order is assumed).
ID2LABEL = {"ag_news": {0: "Sports", 1: "World", 2: "Sci/Tech", 3: "Business"}}
CARDS = {"imdb": "# TextAttack Model Card\n\nLabels: LABEL_0: pos, LABEL_1: neg\n"}
ORDERS = {"ag_news": [1, 0, 3, 2], "imdb": [1, 0], "mnli": [1, 2, 0], "mrpc": [0, 1]}
"""For each task, the model output that means dataset label k (what the test expects, worked out by hand)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import datasets

    datasets.disable_progress_bars()
    return build_roberta_world(tmp_path_factory.mktemp("roberta-world"), id2label=ID2LABEL, cards=CARDS)


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


def _expert(world, task: str):
    from transformers import RobertaForSequenceClassification

    return RobertaForSequenceClassification.from_pretrained(world.snapshot(world.suite.experts[task])).eval()


class IndependentRoberta:
    """Each task scored with transformers alone: the tokenizer on the example's fields (pairs as text and text_pair,
    truncated to 512 tokens, padded to the longest), a RobertaForSequenceClassification, and the logits' columns put
    in the dataset's order by `ORDERS`."""

    def __init__(self, world):
        from transformers import AutoTokenizer

        self.world = world
        self.tok = AutoTokenizer.from_pretrained(world.snapshot(BASE))

    def data(self, task: str):
        from datasets import load_from_disk

        spec = self.world.suite.tasks[task]
        rows = load_from_disk(str(self.world.data_dir / spec.dataset / spec.test_split))
        enc = self.tok(*[list(rows[f]) for f in spec.text_fields], padding=True, truncation=True, max_length=512,
                       return_tensors="pt")
        return enc, torch.tensor(list(rows["label"]))

    @torch.no_grad()
    def metrics(self, classifier_of, tasks) -> dict[str, dict[str, float]]:
        out = {}
        for t in tasks:
            enc, labels = self.data(t)
            logits = classifier_of(t)(**enc).logits[:, :self.world.suite.tasks[t].num_labels][:, ORDERS[t]]
            out[t] = {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
                      "loss": float(F.cross_entropy(logits, labels)), "examples": float(len(labels))}
        return out


def _check(stored, expected) -> None:
    for t, m in expected.items():
        assert stored[t]["examples"] == m["examples"], t
        assert stored[t]["accuracy"] == pytest.approx(m["accuracy"]), (t, stored[t], m)
        assert math.isclose(stored[t]["loss"], m["loss"], rel_tol=1e-4, abs_tol=1e-4), (t, stored[t], m)


def _run(offline_env, pool: str, capsys) -> dict:
    store_path = offline_env / "results.sqlite"
    code = main(["run", "--method", "ties", "--modelpool", pool, "--store", str(store_path)])
    assert code == 0, capsys.readouterr().err
    rows = {r.method: r for r in ResultStore(store_path).all()}
    assert all(r.status == "ok" for r in rows.values()), [r.error for r in rows.values()]
    return rows


def test_expert_heads_mode_matches_independent_transformers(world, offline_env, capsys):
    from mergebench_ties import Ties
    from transformers import RobertaModel

    rows = _run(offline_env, "roberta-base_textattack4", capsys)
    reference = IndependentRoberta(world)
    experts = {t: _expert(world, t) for t in world.tasks}

    def with_body(body):
        def classifier(t):
            clf = _expert(world, t)
            clf.roberta.load_state_dict(body)
            return clf
        return classifier

    base = RobertaModel.from_pretrained(world.snapshot(BASE), add_pooling_layer=False).state_dict()
    _check(rows["pretrained"].metrics, reference.metrics(with_body(base), world.tasks))
    _check(rows["individual"].metrics, reference.metrics(lambda t: experts[t], world.tasks))
    merged: dict[str, torch.Tensor] = {}
    merge_sources(Ties(), StateDictSource(base, "base"),
                  [StateDictSource(experts[t].roberta.state_dict(), t) for t in world.tasks], sink=merged)
    _check(rows["ties"].metrics, reference.metrics(with_body(merged), world.tasks))


def _padded(world, task: str | None) -> dict[str, torch.Tensor]:
    """A 4-output RobertaForSequenceClassification state dict: the expert's, its head's rows zero-padded, or
    roberta-base's body with a zero head."""
    from transformers import AutoConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    shell = RobertaForSequenceClassification(AutoConfig.from_pretrained(world.snapshot(BASE), num_labels=4))
    out = {}
    if task is None:
        body = RobertaForMaskedLM.from_pretrained(world.snapshot(BASE)).roberta.state_dict()
        for k, v in shell.state_dict().items():
            out[k] = body[k.removeprefix("roberta.")] if k.startswith("roberta.") else torch.zeros_like(v)
        return out
    own = _expert(world, task).state_dict()
    for k, v in shell.state_dict().items():
        pad = torch.zeros_like(v)
        pad[tuple(slice(0, s) for s in own[k].shape)] = own[k]
        out[k] = pad
    return out


def test_padded_heads_mode_merges_heads_and_slices_each_task_back(world, offline_env, capsys):
    from mergebench_ties import Ties
    from transformers import AutoConfig, RobertaForSequenceClassification

    rows = _run(offline_env, "roberta-base_textattack4_padded-heads", capsys)
    reference = IndependentRoberta(world)

    def model_of(state):
        clf = RobertaForSequenceClassification(AutoConfig.from_pretrained(world.snapshot(BASE), num_labels=4))
        clf.load_state_dict(state)
        return clf.eval()

    _check(rows["individual"].metrics, reference.metrics(lambda t: model_of(_padded(world, t)), world.tasks))
    merged: dict[str, torch.Tensor] = {}
    merge_sources(Ties(), StateDictSource(_padded(world, None), "base"),
                  [StateDictSource(_padded(world, t), t) for t in world.tasks], sink=merged)
    assert merged["classifier.out_proj.weight"].abs().sum() > 0  # the heads were merged, from a zero base head
    merged_model = model_of(merged)
    _check(rows["ties"].metrics, reference.metrics(lambda t: merged_model, world.tasks))
    zero_head = rows["pretrained"].metrics
    assert all(zero_head[t]["loss"] == pytest.approx(math.log(world.suite.tasks[t].num_labels)) for t in world.tasks)


def test_each_output_order_comes_from_config_card_or_catalog(world, offline_env):
    from mergebench_text_tasks import TextClassificationTaskPool

    pool = TextClassificationTaskPool("roberta-base_textattack4")
    sources = {t: pool.label_order(t) for t in world.tasks}
    assert {t: list(o.order) for t, o in sources.items()} == ORDERS
    assert sources["ag_news"].source == "config id2label"
    assert sources["imdb"].source == "model card"
    assert sources["mnli"].source.startswith("catalog: TextAttack")
    assert sources["mrpc"].source == "dataset order (assumed)"


def test_pool_body_and_padded_state_dicts(world, offline_env):
    from mergebench_text import TextModelPool
    from transformers import RobertaModel

    pool = TextModelPool("roberta-base_textattack4")
    src = pool.tensor_source("imdb")  # stored as pytorch_model.bin: read with the weights-only loader
    body = RobertaModel.from_pretrained(world.snapshot("textattack/roberta-base-imdb"),
                                        add_pooling_layer=False).state_dict()
    assert src.keys() == list(body)
    assert all(torch.equal(src.get(k), body[k]) for k in body)
    padded = TextModelPool("roberta-base_textattack4_padded-heads")
    assert padded.max_labels == 4
    sd = padded.state_dict("imdb")
    assert sd["classifier.out_proj.weight"].shape == (4, 32)
    assert torch.equal(sd["classifier.out_proj.weight"][2:], torch.zeros(2, 32))
    assert torch.equal(padded.state_dict(PRETRAINED)["classifier.dense.weight"], torch.zeros(32, 32))


DATA_METHODS = {
    "regmean": ["regmean.n_examples=8"],
    "regmean_pp": ["regmean_pp.n_examples=8"],
    "fisher": ["fisher.n_examples=6"],
    "gradient_matching": ["gradient_matching.n_examples=6"],
    "adamerging_lw": ["adamerging_lw.steps=2", "adamerging_lw.batch_size=4"],
}


@pytest.mark.parametrize("pool", ["roberta-base_textattack4", "roberta-base_textattack4_padded-heads"])
def test_data_dependent_methods_run_in_both_head_modes(pool, world, offline_env, monkeypatch, capsys):
    monkeypatch.setenv("MERGEBENCH_PLUGINS", "text,text_tasks,regmean,regmean_pp,fisher,gradient_matching,adamerging")
    store_path = offline_env / "results.sqlite"
    code = main(["run", "--method", ",".join(DATA_METHODS), "--modelpool", pool, "--tasks", "ag_news,mnli",
                 "--store", str(store_path), *[o for v in DATA_METHODS.values() for o in v]])
    assert code == 0, capsys.readouterr().err
    rows = {r.method: r for r in ResultStore(store_path).all() if r.kind == "method"}
    assert set(rows) == set(DATA_METHODS)
    assert all(r.status == "ok" for r in rows.values()), {m: r.error for m, r in rows.items()}
    regressed = set(rows["regmean"].extras["regressed"])
    prefix = "roberta." if pool.endswith("padded-heads") else ""
    assert f"{prefix}encoder.layer.1.attention.self.query.weight" in regressed
    assert ("classifier.out_proj.weight" in regressed) == pool.endswith("padded-heads")
