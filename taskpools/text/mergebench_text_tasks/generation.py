"""Flan-T5 task pools: eight GLUE tasks posed as prompts, scored by the words the model generates (FusionBench's
`FlanT5GLUETextGenerationTaskPool`).

Inputs are the prompt's token ids (FusionBench's templates, `catalog.FLAN_T5_PROMPTS`), truncated to `max_length`
(512, the tokenizer's limit FusionBench pads to). Labels are class ids, or for STS-B the score as FusionBench's target
text carries it (formatted with one decimal, then read back).

`logits(model, task, inputs)` answers in one of two ways:

- **Scoring** (under `torch.inference_mode()`, which is how mergebench evaluates): greedy generation of at most 10
  tokens (`generate(max_length=10)`, FusionBench's call), decoded without special tokens and compared with each label
  word decoded the same way. A classification task gets one-hot rows over its classes plus a last column, "none of
  the label words", so accuracy is FusionBench's exact-match accuracy (the `loss` stored beside it is the
  cross-entropy of those one-hot rows, not a property of the model). STS-B gets the generated number, 0.0 when it
  does not parse (FusionBench's rule), as a single column for the Spearman correlation.
- **Differentiable** (anywhere else: Fisher, AdaMerging, training): each label word's log-likelihood under the
  decoder given the prompt (teacher-forced, end-of-sequence token included), plus a last column for the probability
  of every other output, log(1 − Σ p): a proper distribution over the same outcomes the scoring counts. STS-B's
  outcomes are the 51 scores "0.0" … "5.0".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import TextTaskPool
from .catalog import FLAN_T5_PROMPTS, Prompt
from .tokens import trim

log = logging.getLogger(__name__)

MAX_GENERATION_LENGTH = 10
"""FusionBench's `model.generate(input_ids, max_length=10)`: the decoder start token and up to 9 generated."""
STSB_SCORES = tuple(f"{i / 10:.1f}" for i in range(51))


class Seq2SeqGenerationTaskPool(TextTaskPool):
    """Exact-match accuracy of generated label words (Spearman correlation of generated scores for STS-B)."""

    def __init__(self, suite_name: str, *, tasks: Sequence[str] | None = None, max_length: int | None = None,
                 batch_size: int | None = None, cache_root: Path | None = None):
        super().__init__(suite_name, tasks=tasks, max_length=max_length, batch_size=batch_size,
                         cache_root=cache_root)
        if self.suite.kind != "seq2seq":
            raise ValueError(f"suite {suite_name!r} is not a sequence-to-sequence suite")
        self.prompts: dict[str, Prompt] = {t: FLAN_T5_PROMPTS[t] for t in self._tasks}

    def preprocessing_id(self, task: str) -> str:
        import hashlib

        return "prompt-v1-" + hashlib.sha256(self.prompts[task].template.encode()).hexdigest()[:12]

    def encode_texts(self, task: str, columns: dict[str, Sequence[Any]]) -> list[list[int]]:
        spec, prompt = self.specs[task], self.prompts[task]
        n = len(columns[spec.text_fields[0]])
        texts = [prompt.template.format(**{f: columns[f][i] for f in spec.text_fields}) for i in range(n)]
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        return [list(x) for x in encoded["input_ids"]]

    def encode_labels(self, task: str, values: Sequence[Any]) -> list[float]:
        if self.specs[task].regression:  # the score as FusionBench's target text carries it ("{:.1f}", read back)
            return [float(self.prompts[task].answer(float(v))) for v in values]
        return list(values)

    # -- the words --------------------------------------------------------------------------------------------
    def outcomes(self, task: str) -> tuple[str, ...]:
        """The answers a task's scoring distinguishes: its label words, or STS-B's 51 scores."""
        prompt = self.prompts[task]
        return STSB_SCORES if prompt.number_format is not None else prompt.targets

    @cached_property
    def _decoded(self) -> dict[str, tuple[str, ...]]:
        """Each outcome as decoding its own tokens without special tokens gives it back (what generations are
        compared with, as FusionBench decodes its target ids)."""
        return {t: tuple(self.tokenizer.decode(self.tokenizer(w)["input_ids"], skip_special_tokens=True)
                         for w in self.outcomes(t)) for t in self._tasks}

    def _outcome_ids(self, task: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of every outcome's tokens with the end-of-sequence token, right-padded: (n, length)."""
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            ids = [self.tokenizer(w)["input_ids"] for w in self.outcomes(task)]
            width = max(len(x) for x in ids)
            out = torch.zeros(len(ids), width, dtype=torch.long)
            mask = torch.zeros(len(ids), width, dtype=torch.bool)
            for i, x in enumerate(ids):
                out[i, :len(x)] = torch.tensor(x)
                mask[i, :len(x)] = True
            return out.to(device), mask.to(device)

        return self._cached(("outcomes", task, str(device)), make)

    # -- logits -------------------------------------------------------------------------------------------------
    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        ids = trim(inputs)
        mask = ids >= 0
        ids = torch.where(mask, ids, torch.full_like(ids, int(self.tokenizer.pad_token_id or 0)))
        if torch.is_inference_mode_enabled():
            return self._generated(model, task, ids, mask.long())
        return self._likelihoods(model, task, ids, mask.long())

    def _generated(self, model: nn.Module, task: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model.generate(input_ids=ids, attention_mask=mask, max_length=MAX_GENERATION_LENGTH, do_sample=False,
                             num_beams=1)
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        if self.prompts[task].number_format is not None:
            return torch.tensor([[_parse_float(t)] for t in texts], device=ids.device)
        words = self._decoded[task]
        picks = [words.index(t) if t in words else len(words) for t in texts]
        return nn.functional.one_hot(torch.tensor(picks, device=ids.device), len(words) + 1).float()

    def _likelihoods(self, model: nn.Module, task: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        words, word_mask = self._outcome_ids(task, ids.device)
        n, batch = len(words), ids.shape[0]
        from transformers.modeling_outputs import BaseModelOutput

        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = encoded.repeat_interleave(n, 0)
        labels = words.repeat(batch, 1)
        label_mask = word_mask.repeat(batch, 1)
        start = torch.full_like(labels[:, :1], int(model.config.decoder_start_token_id))
        decoder_in = torch.cat([start, labels[:, :-1]], -1)  # teacher forcing: the word shifted right
        logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                       attention_mask=mask.repeat_interleave(n, 0), decoder_input_ids=decoder_in).logits
        token_lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        seq_lp = (token_lp * label_mask).sum(-1).view(batch, n)
        rest = torch.log(torch.clamp(1 - seq_lp.exp().sum(-1, keepdim=True), min=1e-12))
        return torch.cat([seq_lp, rest], -1)


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0
