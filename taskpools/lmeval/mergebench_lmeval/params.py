"""The `lmeval` task pool's parameters, chosen in its name: `--taskpool "lmeval(tasks=arc_easy,gsm8k)"`.

They are part of the task pool's stored name (only the values that differ from the defaults), so rows scored on
other tasks, shot counts or task folders never mix.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergebench_core.contract.checked_params import CheckedParams

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class LmEvalParams(CheckedParams):
    tasks: tuple[str, ...] = ()
    """lm-eval task names, as `lm_eval --tasks` takes them. Required: there is no sensible default suite."""
    include_path: str = ""
    """A folder of lm-eval YAML tasks of your own (local JSONL files offline), searched before lm-eval's tasks."""
    num_fewshot: int = -1
    """Few-shot examples per prompt; -1 keeps each task's own setting."""
    backend: str = "hf"
    """"hf": lm-eval's HFLM around the merged model in memory; "vllm": the model saved to a temporary folder and
    served by lm-eval's vLLM wrapper (needs vllm and a GPU)."""
    batch_size: int = 8
    max_length: int = 0
    """Longest context in tokens; 0 takes the model's own (max_position_embeddings)."""
    tokenizer: str = ""
    """Folder or hub id of the tokenizer; empty: the one saved beside the model (its config's name_or_path)."""
    bootstrap_iters: int = 100000
    """lm-eval's bootstrap resamples for the standard errors of metrics that are not plain means."""
    at_least = {"num_fewshot": -1, "batch_size": 1, "max_length": 0, "bootstrap_iters": 0}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
