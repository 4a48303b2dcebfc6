"""A merged model as lm-eval's model: HFLM around the module in memory, or vLLM over a copy saved to disk.

lm-eval scores `transformers` causal LMs; the tokenizer is not part of what a method merges, so it is found beside
the model (the folder or hub id its config was loaded from) unless the task pool names one.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergebench_core.errors import MergebenchError
from mergebench_core.pools import hub

from .params import LmEvalParams

log = logging.getLogger(__name__)


def check_causal_lm(model: nn.Module) -> None:
    """lm-eval drives a `transformers` model (its config, `generate`, its device): refuse anything else by name."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise MergebenchError(f"task pool lmeval scores transformers causal language models, and the model to score "
                              f"is a {type(model).__name__}; use a model pool of causal LMs (AutoModelForCausalLM)")


def tokenizer_source(model: nn.Module, tokenizer: str = "") -> str:
    """Where the tokenizer comes from: the task pool's `tokenizer`, else the folder or hub id the model was loaded
    from (kept in its config by `from_pretrained`, and by merges, which copy the pretrained model)."""
    source = tokenizer or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not source:
        raise MergebenchError("task pool lmeval: the model does not say where its tokenizer is (its config has no "
                              "name_or_path); name one with lmeval(tokenizer=FOLDER_OR_HUB_ID)")
    return source


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    if Path(source).expanduser().is_dir():
        return AutoTokenizer.from_pretrained(str(Path(source).expanduser()))
    snapshot = hub.cached_snapshot(source)
    if snapshot is not None:
        return AutoTokenizer.from_pretrained(str(snapshot))
    hub.require_online([f"tokenizer {source}"])
    return AutoTokenizer.from_pretrained(source)


def language_model(model: nn.Module, params: LmEvalParams, device: torch.device) -> Any:
    """lm-eval's LM for `model`, on `device`."""
    check_causal_lm(model)
    tokenizer = load_tokenizer(tokenizer_source(model, params.tokenizer))
    if params.backend == "vllm":
        return _vllm(model, tokenizer, params)
    from lm_eval.models.huggingface import HFLM

    model = model.to(device).eval()
    kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": params.batch_size}
    if params.max_length:
        kwargs["max_length"] = params.max_length
    return HFLM(**kwargs)


def _vllm(model: nn.Module, tokenizer: Any, params: LmEvalParams) -> Any:
    """vLLM loads models from disk only: the merged model and its tokenizer are saved to a temporary folder, which
    lives as long as the returned LM."""
    try:
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError as exc:
        raise MergebenchError(f"task pool lmeval(backend=vllm) needs vLLM ({exc}); install it with "
                              f"`pip install 'lm-eval[vllm]'` on a machine with a GPU, or use backend=hf") from None
    folder = tempfile.TemporaryDirectory(prefix="mergebench-vllm-")
    model.save_pretrained(folder.name)
    tokenizer.save_pretrained(folder.name)
    kwargs: dict[str, Any] = {"pretrained": folder.name, "batch_size": params.batch_size}
    if params.max_length:
        kwargs["max_length"] = params.max_length
    lm = VLLM(**kwargs)
    lm._mergebench_folder = folder  # removed with the LM
    return lm
