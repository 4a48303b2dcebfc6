"""Tiny causal LMs, a tokenizer and lm-eval task files written on the spot, for tests that must run offline in
seconds: a random `LlamaForCausalLM` (or Gemma) over a whitespace word-level vocabulary, and two lm-eval YAML tasks
over local JSONL files (multiple choice and greedy generation)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

WORDS = ("the", "cat", "dog", "sat", "ran", "on", "mat", "red", "blue", "big", "small", "what", "is", "answer",
         "question", ":", "?", "yes", "no", "one", "two", "three", "four", "five")
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")


def tiny_tokenizer() -> Any:
    """A `PreTrainedTokenizerFast` over a word-level vocabulary split on whitespace (no download, no training)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate((*SPECIAL, *WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=64)


def tiny_causal_lm(seed: int = 0, family: str = "llama") -> Any:
    """A random 2-layer causal LM of `family` ("llama" or "gemma") over `tiny_tokenizer`'s vocabulary, with weights
    large enough that its choices are not ties."""
    import transformers

    vocab = len(SPECIAL) + len(WORDS)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gemma":
        config = transformers.GemmaConfig(head_dim=8, **common)
        cls = transformers.GemmaForCausalLM
    else:
        config = transformers.LlamaConfig(tie_word_embeddings=False, **common)
        cls = transformers.LlamaForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(config).eval()


def save_model(folder: Path, seed: int = 0, family: str = "llama") -> Path:
    """A tiny model and its tokenizer saved together, as a pool's folder holds them."""
    tiny_causal_lm(seed, family).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_DOCS = (
    {"question": "the cat sat on the", "choices": ["mat", "dog", "red"], "gold": 0},
    {"question": "what is big ?", "choices": ["the dog", "the cat", "one"], "gold": 1},
    {"question": "the dog ran", "choices": ["yes", "no"], "gold": 1},
    {"question": "two three", "choices": ["four", "five", "one", "blue"], "gold": 3},
    {"question": "is the mat red ?", "choices": ["yes", "no"], "gold": 0},
    {"question": "the small cat", "choices": ["sat on the mat", "ran", "is blue"], "gold": 2},
)


def write_multiple_choice_task(folder: Path, name: str = "tiny_mc", docs: Sequence[dict[str, Any]] = MC_DOCS) -> Path:
    """An lm-eval multiple-choice task over a local JSONL file: context `question: Q answer:`, choices ` C`."""
    data = write_jsonl(folder / f"{name}.jsonl", docs)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "question : {{question}} answer :"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    return folder / f"{name}.yaml"


def write_generation_task(folder: Path, docs: Sequence[dict[str, Any]], name: str = "tiny_gen",
                          max_gen_toks: int = 3) -> Path:
    """An lm-eval generate_until task over a local JSONL file ({"prompt", "target"}), greedy, `max_gen_toks` tokens,
    scored by exact match of the stripped generation."""
    data = write_jsonl(folder / f"{name}.jsonl", docs)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        f"generation_kwargs:\n  until: [\"</s>\"]\n  do_sample: false\n  max_gen_toks: {max_gen_toks}\n"
        "filter_list:\n  - name: stripped\n    filter:\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "    ignore_case: false\n    ignore_punctuation: false\n"
        "metadata:\n  version: 1.0\n")
    return folder / f"{name}.yaml"
