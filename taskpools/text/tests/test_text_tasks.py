"""The text task catalog against FusionBench's facts, label orders from configs and cards, the tokenized split cache,
and offline resource reports."""

from __future__ import annotations

import pytest
import torch
from mergebench_text_tasks import SUITES, suite
from mergebench_text_tasks import labels as L
from mergebench_text_tasks.catalog import FLAN_T5_PROMPTS, GLUE_TASKS


def test_suites_name_fusionbench_and_seed_models():
    assert suite("gpt2_glue").task_names == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2"]
    assert suite("gpt2_glue").base_model == "gpt2" and suite("gpt2_glue").experts["qqp"] == "tanganke/gpt2_qqp"
    t5, lora = suite("flan-t5-base_glue"), suite("flan-t5-base_glue-lora16")
    assert t5.task_names == lora.task_names == [*suite("gpt2_glue").task_names, "stsb"]
    assert t5.experts["stsb"] == "tanganke/flan-t5-base_glue-stsb"
    assert lora.experts["rte"] == "tanganke/flan-t5-base_glue-rte_lora-16" and lora.lora
    ta = suite("roberta-base_textattack4")
    assert ta.base_model == "FacebookAI/roberta-base"
    assert ta.experts == {"ag_news": "textattack/roberta-base-ag-news", "imdb": "textattack/roberta-base-imdb",
                          "mnli": "textattack/roberta-base-MNLI", "mrpc": "textattack/roberta-base-MRPC"}
    assert [ta.tasks[t].dataset for t in ta.task_names] == ["wangrongsheng/ag_news", "stanfordnlp/imdb",
                                                            "SetFit/mnli", "SetFit/mrpc"]
    assert suite("roberta-base_textattack4_padded-heads").head_mode == "padded"
    assert GLUE_TASKS["mnli"].test_split == "validation_matched"
    assert all(GLUE_TASKS[t].test_split == "validation" for t in ("cola", "mrpc", "qnli", "qqp", "rte", "sst2"))
    assert set(SUITES) == {"gpt2_glue", "flan-t5-base_glue", "flan-t5-base_glue-lora16", "roberta-base_textattack4",
                           "roberta-base_textattack4_padded-heads"}


def test_flan_t5_label_words_are_fusionbench_targets():
    words = {t: p.targets for t, p in FLAN_T5_PROMPTS.items() if p.targets}
    assert words == {"cola": ("unacceptable", "acceptable"), "mnli": ("entailment", "neutral", "contradiction"),
                     "mrpc": ("no", "yes"), "qnli": ("yes", "no"), "qqp": ("no", "yes"), "rte": ("yes", "no"),
                     "sst2": ("negative", "positive")}
    assert FLAN_T5_PROMPTS["stsb"].answer(3.75) == "3.8" and FLAN_T5_PROMPTS["stsb"].answer(2) == "2.0"
    assert FLAN_T5_PROMPTS["cola"].template.format(sentence="x").endswith("Answere 'acceptable' or 'unacceptable'.")


def test_label_order_from_config_names_with_synonyms():
    assert L.from_config({"0": "Sports", "1": "World", "2": "Sci/Tech", "3": "Business"},
                         ("World", "Sports", "Business", "Sci/Tech")) == (1, 0, 3, 2)
    assert L.from_config({0: "POSITIVE", 1: "NEGATIVE"}, ("neg", "pos")) == (1, 0)
    assert L.from_config({0: "LABEL_0", 1: "LABEL_1"}, ("neg", "pos")) is None  # names nothing
    assert L.from_config({0: "a", 1: "a"}, ("a", "b")) is None


def test_label_order_from_card_tables_and_lines():
    table = "| id | label |\n|---|---|\n| 0 | contradiction |\n| 1 | entailment |\n| 2 | neutral |\n"
    assert L.from_card(table, ("entailment", "neutral", "contradiction")) == (1, 2, 0)
    assert L.from_card("LABEL_0 -> neutral\nLABEL_1 -> entailment\nLABEL_2 -> contradiction\n",
                       ("entailment", "neutral", "contradiction")) == (1, 0, 2)
    assert L.from_card("0: neg, 1: pos, 0: pos", ("neg", "pos")) is None  # contradicts itself
    assert L.from_card("trained for 5 epochs with batch size 16, 0: neg", ("neg", "pos")) is None  # incomplete
    assert L.from_card(None, ("neg", "pos")) is None


def test_resolve_precedence_and_the_catalog(caplog):
    mnli = ("entailment", "neutral", "contradiction")
    by_config = L.resolve("textattack/roberta-base-MNLI", {0: "entailment", 1: "neutral", 2: "contradiction"},
                          None, mnli)
    assert by_config.order == (0, 1, 2) and by_config.source == "config id2label"  # the config wins over the catalog
    catalog = L.resolve("textattack/roberta-base-MNLI", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, "no labels", mnli)
    assert catalog.order == (1, 2, 0) and catalog.source.startswith("catalog")
    assert L.resolve("tanganke/gpt2_mnli", None, None, mnli).order == (0, 1, 2)
    with caplog.at_level("WARNING"):
        assumed = L.resolve("someone/model", None, None, ("a", "b"))
    assert assumed.identity and assumed.source == "dataset order (assumed)" and "assuming" in caplog.text


def test_best_permutation_finds_a_wrong_declared_order():
    confusion = [[1, 40, 2], [3, 2, 35], [30, 4, 1]]  # rows: dataset label; columns: model output
    order, accuracy = L.best_permutation(confusion)
    assert order == (1, 2, 0) and accuracy == pytest.approx(105 / 118)


def test_tokenized_split_caches_chunks_and_never_reopens(tmp_path, monkeypatch):
    from mergebench_text_tasks import tokens

    monkeypatch.setattr(tokens, "CHUNK", 4)
    rows = {"text": [f"example {i}" for i in range(10)], "label": list(range(10))}

    class Rows:
        def __len__(self):
            return 10

        def __getitem__(self, s):
            return {k: v[s] for k, v in rows.items()}

    opened = []

    def encode(columns):
        return [[len(t), int(t.split()[1]), 7, 7, 7] for t in columns["text"]], list(columns["label"])

    def make():
        return tokens.TokenizedSplit(tmp_path / "split", lambda: opened.append(1) or Rows(), encode, max_length=4)

    first = make()
    x, y = first.rows([9, 0, 5])
    assert x.tolist() == [[9, 9, 7, 7], [9, 0, 7, 7], [9, 5, 7, 7]] and y.tolist() == [9, 0, 5]  # truncated to 4
    assert sorted(p.name for p in (tmp_path / "split").glob("chunk-*")) == ["chunk-00000.npz", "chunk-00001.npz",
                                                                          "chunk-00002.npz"]
    assert len(opened) == 1
    again = make()
    assert [b[1].tolist() for b in again.batches(4, limit=6)] == [[0, 1, 2, 3], [4, 5]]
    assert len(again) == 10 and len(opened) == 1  # the length and the chunks come from the cache


def test_trim_drops_only_columns_that_are_padding_everywhere():
    from mergebench_text_tasks.tokens import trim

    x = torch.tensor([[5, 6, -1, -1, -1], [5, 6, 7, -1, -1]])
    assert trim(x).tolist() == [[5, 6, -1], [5, 6, 7]]
    vmapped = torch.func.vmap(lambda row: trim(row[None]).sum())(x)  # no data-dependent width under vmap
    assert vmapped.tolist() == [x[0].sum().item(), x[1].sum().item()]


def test_offline_missing_resources_of_the_lora_pool_name_adapters_and_datasets(tmp_path, monkeypatch):
    from mergebench_text import TextModelPool
    from mergebench_text_tasks import taskpool_factory

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("MERGEBENCH_TEXT_DATA_DIR", raising=False)
    models = TextModelPool("flan-t5-base_glue-lora16").missing_resources()
    assert models[0] == "model google/flan-t5-base" and "model tanganke/flan-t5-base_glue-stsb_lora-16" in models
    assert len(models) == 9
    data = taskpool_factory("flan-t5-base_glue-lora16")().missing_resources()
    assert "dataset nyu-mll/glue (mnli) [validation_matched]" in data and len(data) == 9  # tokenizer + 8 datasets
    ta = taskpool_factory("roberta-base_textattack4")().missing_resources()
    assert "dataset SetFit/mnli [validation]" in ta and "model textattack/roberta-base-MNLI" in ta
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    from mergebench_core.pools import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    assert TextModelPool("flan-t5-base_glue-lora16").missing_resources() == []


def test_dataset_available_checks_the_config_folder_of_glue(tmp_path, monkeypatch):
    from mergebench_core.pools import hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("MERGEBENCH_TEXT_DATA_DIR", raising=False)
    snap = tmp_path / "datasets--nyu-mll--glue" / "snapshots" / "abc"
    (snap / "cola").mkdir(parents=True)
    (snap / "cola" / "validation-00000-of-00001.parquet").write_bytes(b"")
    env = "MERGEBENCH_TEXT_DATA_DIR"
    assert hub.dataset_available("nyu-mll/glue", "cola", "validation", local_env=env)
    assert not hub.dataset_available("nyu-mll/glue", "mnli", "validation_matched", local_env=env)
    assert not hub.dataset_available("SetFit/mnli", None, "validation", local_env=env)
