"""Sequence classification task pools: GPT-2 on seven GLUE tasks and RoBERTa-base on the four textattack tasks.

The model scored is the merged *body* (`GPT2Model`, `RobertaModel` without pooler). Each task is read out through its
own expert's head, taken from the expert's checkpoint, exactly as the expert's `...ForSequenceClassification` does:

- GPT-2: `score` (no bias) on the hidden state of the last real token of each sequence (FusionBench's
  `GPT2TextClassificationTaskPool` swaps the merged body into each expert's `GPT2ForSequenceClassification`);
- RoBERTa: `classifier.dense` → tanh → `classifier.out_proj` on the first token (`<s>`).

With `head_mode="padded"` (the seed's way, pool `roberta-base_textattack4_padded-heads`) the heads are part of the
merged model instead: the model scored is a `RobertaForSequenceClassification` whose `out_proj` has as many rows as
the largest task has labels, and task t reads its first n_t logits.

Either way the logits' columns are put in the dataset's label order (`labels.resolve`: config, card, catalog).
Inputs are the token ids of `tokens.py` (PAD = -1 marks padding); padding columns are trimmed before the forward.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from mergebench_core.pools import hub
from mergebench_core.pools.hf_models import read_tensors

from .base import TextTaskPool
from .labels import LabelOrder, resolve
from .tokens import trim

log = logging.getLogger(__name__)

HEAD_KEYS = {
    "gpt2": ("score.weight",),
    "roberta": ("classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                "classifier.out_proj.bias"),
}


class TextClassificationTaskPool(TextTaskPool):
    """Accuracy (and Matthews correlation for CoLA) of a merged text encoder through each task's expert head."""

    def __init__(self, suite_name: str, *, tasks: Sequence[str] | None = None, max_length: int | None = None,
                 batch_size: int | None = None, cache_root: Path | None = None):
        super().__init__(suite_name, tasks=tasks, max_length=max_length, batch_size=batch_size,
                         cache_root=cache_root)
        if self.suite.kind != "classification":
            raise ValueError(f"suite {suite_name!r} is not a classification suite")
        self.architecture, self.head_mode = self.suite.architecture, self.suite.head_mode
        self._label_orders: dict[str, LabelOrder] = {}

    def models_needed(self) -> list[str]:
        return [self.suite.base_model, *(self.suite.experts[t] for t in self._tasks)]

    def version_info(self) -> dict[str, str]:
        info = super().version_info()
        info[f"text_tasks/{self.name}/heads"] = ",".join(
            f"{self.suite.experts[t]}@{hub.model_revision(self.suite.experts[t])[:12]}" for t in self._tasks)
        return info

    @cached_property
    def pad_id(self) -> int:
        """The id written into padded positions (never attended to): the tokenizer's pad token, else its unk or eos
        token as FusionBench sets GPT-2's pad token."""
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    # -- heads and labels ---------------------------------------------------------------------------------------
    def expert_config(self, task: str) -> dict:
        import json

        folder = Path(hub.model_location(self.suite.experts[task]))
        return json.loads((folder / "config.json").read_text())

    def label_order(self, task: str) -> LabelOrder:
        """Which output of task's expert means which dataset label (see `labels.py`), resolved once."""
        if task not in self._label_orders:
            spec = self.specs[task]
            repo = self.suite.experts[task]
            self._label_orders[task] = resolve(repo, self.expert_config(task).get("id2label"), hub.model_card(repo),
                                               spec.label_names)
            log.info("%s: output order %s (from %s)", repo, self._label_orders[task].order,
                     self._label_orders[task].source)
        return self._label_orders[task]

    def head(self, task: str) -> dict[str, torch.Tensor]:
        """The classification head of task's expert, as stored in its checkpoint."""
        repo = self.suite.experts[task]
        prefixes = ("", "model.", "transformer.") if self.architecture == "gpt2" else ("", "model.")
        return read_tensors(hub.model_location(repo), HEAD_KEYS[self.architecture], repo, prefixes)

    def _head_on(self, task: str, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._cached(("head", task, str(like.device), like.dtype),
                            lambda: {k: v.to(like.device, like.dtype) for k, v in self.head(task).items()})

    def _order_on(self, task: str, device: torch.device) -> torch.Tensor | None:
        order = self.label_order(task)
        if order.identity:
            return None
        return self._cached(("order", task, str(device)), lambda: torch.tensor(order.order, device=device))

    # -- logits -------------------------------------------------------------------------------------------------
    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        ids = trim(inputs)
        mask = ids >= 0
        ids = torch.where(mask, ids, torch.full_like(ids, self.pad_id))
        attention = mask.long()
        if self.head_mode == "padded":
            out = model(input_ids=ids, attention_mask=attention).logits[..., :self.specs[task].num_labels]
        else:
            hidden = model(input_ids=ids, attention_mask=attention).last_hidden_state
            if self.architecture == "gpt2":
                positions = torch.arange(ids.shape[-1], device=ids.device)
                last = (positions * mask).argmax(-1)  # the rightmost real token, as GPT2ForSequenceClassification
                pooled = torch.gather(hidden, 1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
                out = pooled @ self._head_on(task, pooled)["score.weight"].T
            else:
                head = self._head_on(task, hidden)
                x = torch.tanh(hidden[:, 0] @ head["classifier.dense.weight"].T + head["classifier.dense.bias"])
                out = x @ head["classifier.out_proj.weight"].T + head["classifier.out_proj.bias"]
        order = self._order_on(task, out.device)
        return out if order is None else out.index_select(-1, order)
