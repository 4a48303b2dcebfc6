"""LoRA experts: the base fine-tuned on one task's training pairs through a peft LoRA adapter, on the CPU.

The loss is the causal LM's cross-entropy on the answer tokens only (` target` and the newline that ends it; the
prompt is context; code answers follow their prompt with no space), so an expert learns to answer in the format it is scored in. Adam, `steps` steps of
`batch_size` pairs drawn with replacement from a generator of the expert's own (seed, task), one torch thread while
training (the same float sums, so the same bits, on every machine). Adapters are rank `rank`, α = 2·rank, on every
linear layer of attention and MLP, no dropout, no bias: plain LoRA, which `lora_task_arithmetic` can merge in
factored form. The adapter folder (peft's own format) is cached by its recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergebench_core.contract.checked_params import CheckedParams

from .tasks import load_task

__all__ = ["LORA_TARGETS", "GemmaLoraParams", "train_adapter"]

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_TOKENS = 128  # longer pairs (HumanEval prompts) lose the start of their prompt


@dataclass(frozen=True)
class GemmaLoraParams(CheckedParams):
    """How the LoRA experts are trained (the pool's parameters: `gemma3-270m_lora4(steps=200,lr=5e-4)`)."""

    lr: float = 1e-3
    """Adam's learning rate."""
    steps: int = 30
    """Optimizer steps per expert."""
    batch_size: int = 8
    """Training pairs per step, drawn with replacement."""
    rank: int = 4
    """LoRA rank r (α = 2r)."""
    seed: int = 0
    """Seeds each expert's batch order and LoRA initialisation."""

    above = {"lr": 0.0}
    at_least = {"steps": 1, "batch_size": 1, "rank": 1, "seed": 0}
    at_most = {"lr": 1.0, "steps": 10**6, "batch_size": 1024, "rank": 256, "seed": 2**32 - 1}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _generator(params: GemmaLoraParams, task: str) -> torch.Generator:
    seed = int(hashlib.sha256(f"{params.seed}/{task}/lora".encode()).hexdigest()[:15], 16)
    return torch.Generator().manual_seed(seed)


def encode_pairs(tokenizer: Any, pairs: list[tuple[str, str]], separator: str = " ") -> list[tuple[list[int], int]]:
    """Token ids of BOS, prompt, separator + target + newline, and where the answer starts. A pair longer than
    `MAX_TOKENS` loses the start of its prompt (BOS stays)."""
    out = []
    for prompt, target in pairs:
        context = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        answer = tokenizer(separator + target + "\n", add_special_tokens=False)["input_ids"]
        ids = context + answer
        if len(ids) > MAX_TOKENS:
            ids = ids[:1] + ids[len(ids) - MAX_TOKENS + 1:]
        out.append((ids, max(len(ids) - len(answer), 1)))
    return out


def batch_loss(model: Any, batch: list[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens of `batch`; padding and prompts are not scored.

    Rows are padded on the left (positions counted from each row's first real token), so every answer ends at the
    last column and the output layer, a 262,144-word vocabulary that costs more than the rest of the 270M model on
    short pairs, is applied to the last columns only (`logits_to_keep`)."""
    width = max(len(ids) for ids, _ in batch)
    keep = max(len(ids) - start for ids, start in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), keep), -100, dtype=torch.long)
    for row, (tokens, start) in enumerate(batch):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
        answer = tokens[start:]
        labels[row, keep - len(answer):] = torch.tensor(answer)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep + 1).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels.reshape(-1), ignore_index=-100)


def train_adapter(base: Path, task: str, params: GemmaLoraParams, out: Path) -> dict[str, float]:
    """Train the LoRA expert for `task` from the model folder `base` and save the adapter into `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    task_data = load_task(task)
    data = encode_pairs(tokenizer, task_data.train, task_data.separator)
    gen = _generator(params, task)
    with one_thread(), torch.inference_mode(False), torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # LoRA's initialisation of A
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        config = LoraConfig(r=params.rank, lora_alpha=2 * params.rank, target_modules=list(LORA_TARGETS),
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        peft_model.train()
        opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=params.lr)
        losses = []
        for _ in range(params.steps):
            idx = torch.randint(0, len(data), (params.batch_size,), generator=gen).tolist()
            loss = batch_loss(peft_model, [data[i] for i in idx], tokenizer.pad_token_id or 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if len(losses) % 10 == 0:
                log.info("gemma LoRA expert %s: step %d/%d, loss %.3f (%.0f s)", task, len(losses), params.steps,
                         losses[-1], time.perf_counter() - started)
        peft_model.save_pretrained(str(out))
    seconds = time.perf_counter() - started
    first, last = sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:])
    log.info("gemma LoRA expert %s: %d steps in %.0f s, loss %.3f -> %.3f", task, params.steps, seconds, first, last)
    return {"seconds": round(seconds, 1), "first_loss": first, "last_loss": last,
            **{k: v for k, v in dataclasses.asdict(params).items()}}
