"""Offline stand-ins for tests: tiny random GPT-2, RoBERTa and T5 models with tiny tokenizers, placed under the real
hub ids in the Hugging Face cache layout, and tiny text datasets saved where `$MERGEBENCH_TEXT_DATA_DIR` points.
Nothing here is used by a real run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .catalog import Suite, TextTask, suite

FAKE_REVISION = "0123456789abcdef0123456789abcdef01234567"
WORDS = ("the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "news", "market", "game", "won",
         "film", "was", "good", "bad", "is", "not", "very", "it", "rains", "today", "who", "what", "why", "yes")


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE tokenizers use for bytes (GPT-2's reversible table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_gpt2_tokenizer():
    """Byte-level GPT-2 tokenizer: one token per byte plus <|endoftext|> (id 256), no merges."""
    from transformers import GPT2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    vocab["<|endoftext|>"] = len(vocab)
    return GPT2Tokenizer(vocab=vocab, merges=[])


def tiny_roberta_tokenizer():
    """Byte-level RoBERTa tokenizer: <s>, <pad>, </s>, <unk> (ids 0-3), the 256 bytes, <mask>; no merges."""
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(_byte_chars())})
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[])


def tiny_t5_tokenizer():
    """Unigram T5 tokenizer over single characters and whole words (the prompts' words and the label words are one
    token each, so prompts stay short)."""
    import re

    from transformers import T5Tokenizer

    from .catalog import FLAN_T5_PROMPTS

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    prompt_words = {w for p in FLAN_T5_PROMPTS.values() for w in re.findall(r"[A-Za-z]+", p.template)}
    words = sorted(set(WORDS) | prompt_words | {"acceptable", "unacceptable", "entailment", "neutral",
                                                 "contradiction", "no", "positive", "negative"})
    pieces += [("▁" + w, -2.0) for w in words]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;'\"?!()-/"))
    pieces += [("▁", -3.0)] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def place_in_hub_cache(folder: Path, repo_id: str, hub_cache: Path, revision: str = FAKE_REVISION,
                       repo_type: str = "model") -> Path:
    repo = hub_cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file():
            shutil.copy2(f, snap / f.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


def snapshot(hub_cache: Path, repo_id: str) -> Path:
    return hub_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / FAKE_REVISION


def write_tiny_dataset(data_dir: Path, spec: TextTask, split: str, n: int, seed: int) -> Path:
    """`n` examples of random words in the task's text fields, with labels (floats in [0, 5] for regression)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def sentence() -> str:
        k = int(torch.randint(3, 9, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    columns: dict[str, list] = {f: [sentence() for _ in range(n)] for f in spec.text_fields}
    if spec.regression:
        columns[spec.label_field] = [round(float(x), 3) for x in torch.rand(n, generator=g) * 5]
    else:
        columns[spec.label_field] = [int(x) for x in torch.randint(0, spec.num_labels, (n,), generator=g)]
    columns["idx"] = list(range(n))
    folder = data_dir / spec.dataset
    if spec.config:
        folder = folder / spec.config
    folder = folder / split
    Dataset.from_dict(columns).save_to_disk(str(folder))
    return folder


def _perturbed(state: dict[str, torch.Tensor], noise: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: v + noise * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in state.items()}


@dataclass
class OfflineWorld:
    root: Path
    hub_cache: Path
    data_dir: Path
    suite: Suite
    tasks: list[str]
    extras: dict = field(default_factory=dict)

    def snapshot(self, repo_id: str) -> Path:
        return snapshot(self.hub_cache, repo_id)


def _write_datasets(world_data: Path, s: Suite, tasks: list[str], n_test: int, n_train: int, seed: int) -> None:
    for i, t in enumerate(tasks):
        spec = s.tasks[t]
        write_tiny_dataset(world_data, spec, spec.test_split, n_test, seed + 100 + i)
        write_tiny_dataset(world_data, spec, spec.train_split, n_train, seed + 200 + i)


def build_gpt2_world(root: Path, n_test: int = 10, n_train: int = 24, seed: int = 0, noise: float = 0.05,
                     hidden: int = 32, layers: int = 2, positions: int = 512) -> OfflineWorld:
    """`gpt2` (a tiny GPT2LMHeadModel and its tokenizer) and `tanganke/gpt2_<task>` (GPT2ForSequenceClassification
    with the base body perturbed and a random head), plus validation and train splits of every GLUE task."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    s = suite("gpt2_glue")
    hub_cache, data_dir = root / "hub", root / "data"
    tok = tiny_gpt2_tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(vocab_size=len(tok), n_positions=positions, n_embd=hidden, n_layer=layers, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    base = GPT2LMHeadModel(config).eval()
    base_dir = root / "build" / "gpt2"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    place_in_hub_cache(base_dir, s.base_model, hub_cache)
    body = base.transformer.state_dict()
    for i, t in enumerate(s.task_names):
        plain = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id", "pad_token_id")}
        cfg = GPT2Config(**plain, num_labels=s.tasks[t].num_labels, pad_token_id=eos)
        expert = GPT2ForSequenceClassification(cfg).eval()
        gen = torch.Generator().manual_seed(seed + 1 + i)
        expert.transformer.load_state_dict(_perturbed(body, noise, gen))
        folder = root / "build" / t
        expert.save_pretrained(folder)
        tok.save_pretrained(folder)
        place_in_hub_cache(folder, s.experts[t], hub_cache)
    _write_datasets(data_dir, s, s.task_names, n_test, n_train, seed)
    return OfflineWorld(root, hub_cache, data_dir, s, s.task_names)


def save_as_pickle(folder: Path) -> None:
    """Replace a saved model's safetensors by the pytorch_model.bin that older repositories (textattack) hold."""
    from safetensors.torch import load_file

    st = folder / "model.safetensors"
    torch.save(load_file(str(st)), folder / "pytorch_model.bin")
    st.unlink()


def build_roberta_world(root: Path, n_test: int = 10, n_train: int = 24, seed: int = 0, noise: float = 0.05,
                        hidden: int = 32, layers: int = 2, id2label: dict[str, dict[int, str]] | None = None,
                        cards: dict[str, str] | None = None, pickles: tuple[str, ...] = ("imdb",)) -> OfflineWorld:
    """`FacebookAI/roberta-base` (a tiny RobertaForMaskedLM) and the four `textattack/roberta-base-*` experts
    (RobertaForSequenceClassification, perturbed body, random head; `id2label` and model `cards` per task when
    given; the experts of `pickles` stored as pytorch_model.bin), and their datasets."""
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    s = suite("roberta-base_textattack4")
    hub_cache, data_dir = root / "hub", root / "data"
    tok = tiny_roberta_tokenizer()
    config = RobertaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                           intermediate_size=2 * hidden, max_position_embeddings=300, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    torch.manual_seed(seed)
    base = RobertaForMaskedLM(config).eval()
    base_dir = root / "build" / "roberta-base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    place_in_hub_cache(base_dir, s.base_model, hub_cache)
    body = base.roberta.state_dict()
    for i, t in enumerate(s.task_names):
        n = s.tasks[t].num_labels
        labels = (id2label or {}).get(t) or {k: f"LABEL_{k}" for k in range(n)}
        plain = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
        cfg = RobertaConfig(**plain, id2label=labels, label2id={v: k for k, v in labels.items()})
        expert = RobertaForSequenceClassification(cfg).eval()
        gen = torch.Generator().manual_seed(seed + 1 + i)
        own = expert.roberta.state_dict()
        expert.roberta.load_state_dict(_perturbed({k: body[k] for k in own}, noise, gen))
        with torch.no_grad():  # heads large enough that the experts disagree with each other
            for p in expert.classifier.parameters():
                p.normal_(0, 0.5, generator=gen)
        folder = root / "build" / t
        expert.save_pretrained(folder)
        tok.save_pretrained(folder)
        if t in pickles:
            save_as_pickle(folder)
        if cards and t in cards:
            (folder / "README.md").write_text(cards[t])
        place_in_hub_cache(folder, s.experts[t], hub_cache)
    _write_datasets(data_dir, s, s.task_names, n_test, n_train, seed)
    return OfflineWorld(root, hub_cache, data_dir, s, s.task_names)


def _t5_batch(tok, s: Suite, task: str, data_dir: Path, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, label ids with -100 padding) of the first `n` train examples of `task`."""
    from datasets import load_from_disk

    from .catalog import FLAN_T5_PROMPTS

    spec, prompt = s.tasks[task], FLAN_T5_PROMPTS[task]
    rows = load_from_disk(str(data_dir / spec.dataset / spec.config / spec.train_split)).select(range(n))
    texts = [prompt.template.format(**{f: rows[i][f] for f in spec.text_fields}) for i in range(n)]
    enc = tok(texts, padding=True, return_tensors="pt")
    target = tok([prompt.answer(rows[i][spec.label_field]) for i in range(n)], padding=True, return_tensors="pt")
    labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels


def _t5_train(model, batches: list, steps: int, lr: float, seed: int) -> None:
    """A few steps of Adam on teacher-forced cross-entropy, cycling over the task batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    torch.manual_seed(seed)
    model.train()
    for step in range(steps):
        ids, mask, labels = batches[step % len(batches)]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_t5_world(root: Path, lora: bool = False, n_test: int = 10, n_train: int = 24, seed: int = 0,
                   hidden: int = 32, base_steps: int = 40, expert_steps: int = 30, rank: int = 4) -> OfflineWorld:
    """`google/flan-t5-base` (a tiny T5ForConditionalGeneration taught the label words of every task for a few
    steps) and one expert per GLUE task, fine-tuned from it on its task a few steps more (`tanganke/flan-t5-base_
    glue-<task>`), or, with `lora`, a peft LoRA adapter of rank `rank` on q and v trained so
    (`tanganke/flan-t5-base_glue-<task>_lora-16`); plus validation and train splits of the eight tasks."""
    import copy

    from transformers import T5Config, T5ForConditionalGeneration

    s = suite("flan-t5-base_glue-lora16" if lora else "flan-t5-base_glue")
    hub_cache, data_dir = root / "hub", root / "data"
    _write_datasets(data_dir, s, s.task_names, n_test, n_train, seed)
    tok = tiny_t5_tokenizer()
    config = T5Config(vocab_size=len(tok), d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=2,
                      num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1, tie_word_embeddings=False, feed_forward_proj="gated-gelu",
                      dropout_rate=0.0)
    torch.manual_seed(seed)
    base = T5ForConditionalGeneration(config)
    batches = {t: _t5_batch(tok, s, t, data_dir, n_train) for t in s.task_names}
    _t5_train(base, list(batches.values()), base_steps, 3e-3, seed)
    base_dir = root / "build" / "flan-t5-base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    place_in_hub_cache(base_dir, s.base_model, hub_cache)
    for i, t in enumerate(s.task_names):
        folder = root / "build" / t
        if lora:
            from peft import LoraConfig, get_peft_model

            peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules=["q", "v"], lora_dropout=0.0, task_type="SEQ_2_SEQ_LM"))
            _t5_train(peft_model, [batches[t]], expert_steps, 1e-2, seed + 1 + i)
            peft_model.save_pretrained(folder)
        else:
            expert = copy.deepcopy(base)
            _t5_train(expert, [batches[t]], expert_steps, 3e-3, seed + 1 + i)
            expert.save_pretrained(folder)
            tok.save_pretrained(folder)
        place_in_hub_cache(folder, s.experts[t], hub_cache)
    return OfflineWorld(root, hub_cache, data_dir, s, s.task_names)

