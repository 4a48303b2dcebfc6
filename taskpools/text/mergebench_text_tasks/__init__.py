"""Text task pools for mergebench.

- `gpt2_glue`: seven GLUE tasks, scored through each GPT-2 expert's own classification head (FusionBench);
- `roberta-base_textattack4` and `roberta-base_textattack4_padded-heads`: AG News, IMDB, MNLI and MRPC for
  RoBERTa-base and the textattack experts, heads from the experts or merged with the model (the seed's way);
- `flan-t5-base_glue` and `flan-t5-base_glue-lora16`: eight GLUE tasks scored by generating label words (STS-B by
  Spearman correlation of the generated scores), as FusionBench does.

The model pools of distribution mergebench-text name these as their default task pools.
"""

from __future__ import annotations

from functools import partial

from mergebench_core import hookimpl

from .catalog import SUITES, Suite, TextTask, suite
from .classification import TextClassificationTaskPool

__all__ = ["SUITES", "Suite", "TextClassificationTaskPool", "TextTask", "suite", "taskpool_factory"]


def _seq2seq_taskpool(name: str, **kwargs):
    from .generation import Seq2SeqGenerationTaskPool

    return Seq2SeqGenerationTaskPool(name, **kwargs)


def taskpool_factory(name: str):
    """A zero-argument factory for the task pool of suite `name` (keyword arguments pass through)."""
    if suite(name).kind == "classification":
        return partial(TextClassificationTaskPool, name)
    return partial(_seq2seq_taskpool, name)


@hookimpl
def register_taskpools(register):
    for name, s in SUITES.items():
        what = "label-word generation" if s.kind == "seq2seq" else (
            "heads merged with the model" if s.head_mode == "padded" else "each expert's own head")
        register(name, taskpool_factory(name), f"{len(s.tasks)} text tasks for {s.base_model} ({what})")
