"""Text model pools for mergebench (FusionBench's names where FusionBench has the pool):

- `gpt2_glue`: `gpt2` and `tanganke/gpt2_<task>` for seven GLUE tasks; the GPT-2 body is merged.
- `roberta-base_textattack4`: `FacebookAI/roberta-base` and `textattack/roberta-base-{ag-news,imdb,MNLI,MRPC}`; the
  encoder body is merged and each task is scored with its expert's head (FusionBench's way).
- `roberta-base_textattack4_padded-heads`: the same models with the heads merged too, zero-padded to four outputs
  (the seed's way).
- `flan-t5-base_glue`, `flan-t5-base_glue-lora16`: `google/flan-t5-base` and `tanganke/flan-t5-base_glue-<task>`
  (full fine-tuning) or `..._lora-16` (LoRA r=16 adapters, merged into the base to form the expert).

Each pool's default task pool has its name (distribution mergebench-text-tasks).
"""

from __future__ import annotations

from functools import partial

from mergebench_text_tasks import SUITES

from mergebench_core import hookimpl

from .pools import TextModelPool

__all__ = ["TextModelPool"]


@hookimpl
def register_modelpools(register):
    for name, s in SUITES.items():
        register(name, partial(TextModelPool, name),
                 f"{s.base_model} and {len(s.experts)} experts ({'LoRA adapters' if s.lora else 'full fine-tuning'};"
                 f" Hugging Face hub)")
