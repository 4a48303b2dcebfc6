"""Language-model scoring for mergebench through EleutherAI's lm-evaluation-harness.

`--taskpool "lmeval(tasks=arc_easy,gsm8k)"` scores each merged causal LM (and the pretrained and expert reference
rows) on lm-eval tasks by their lm-eval names, storing lm-eval's metrics and standard errors per task. Tasks of your
own, over local files, come from `include_path=FOLDER`; on an offline machine a task whose data is not here is refused
before any work. `CausalLMFolderPool` is a model pool of causal LMs saved with `save_pretrained` (or LoRA adapters
of the base), and `lora_task_arithmetic` merges LoRA experts in factored form.
"""

from __future__ import annotations

from mergebench_core import hookimpl

from .causal_lm_pool import CausalLMFolderPool
from .lora_method import LoraTaskArithmetic
from .params import LmEvalParams
from .taskpool import LmEvalTaskPool

__all__ = ["CausalLMFolderPool", "LmEvalParams", "LmEvalTaskPool", "LoraTaskArithmetic"]


@hookimpl
def register_methods(register):
    register(LoraTaskArithmetic)


@hookimpl
def register_taskpools(register):
    register("lmeval", LmEvalTaskPool, "lm-evaluation-harness tasks by their lm-eval names (lmeval(tasks=...))",
             params=LmEvalParams)
