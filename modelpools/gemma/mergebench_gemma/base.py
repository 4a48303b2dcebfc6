"""The pretrained model: Gemma-3-270M joined from its four packaged GGUF parts and dequantised once into a cached
Hugging Face folder (float32 safetensors, config, tokenizer, the Gemma terms).

transformers reads GGUF itself (with the `gguf` package) and dequantises every tensor to float32; that takes about
a minute here, so the folder is built once per digest of the GGUF file (and the versions of transformers and gguf,
whose conversion code makes the numbers) and reused: `mergebench_core.pools.folder_cache` checks every file against
its manifest before it is trusted.

Quantisation caveat: the weights are the Q4_K_M quantisation of google/gemma-3-270m (4.5 bits a weight on average),
dequantised. The base therefore carries the quantisation noise of its 4-bit grid: it is a real pretrained model, but
not bit-identical to the bfloat16 release, and its scores are not Google's published ones. Every expert is
fine-tuned from this dequantised base, so task vectors and merges are exact relative to it.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mergebench_core.pools import packaged
from mergebench_core.pools.folder_cache import cached_folder

from . import sources

__all__ = ["base_folder", "base_key", "joined_gguf"]

log = logging.getLogger(__name__)

VERSION = 1  # bump when the folder's recipe changes in a way the key does not show


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def base_key() -> dict[str, Any]:
    return {"what": "gemma/base", "gguf": sources.GGUF_SHA256, "transformers": _version("transformers"),
            "gguf_reader": _version("gguf"), "dtype": "float32", "version": VERSION}


def joined_gguf(root: Path) -> Path:
    """The GGUF file joined from its four packaged parts, each part and the whole checked by SHA-256."""
    return packaged.verified_join(sources.GGUF_PARTS, sources.GGUF_SHA256, Path(root) / "gguf" / sources.GGUF_NAME)


def _build(root: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    gguf = joined_gguf(root)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    import torch

    read = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a model read from GGUF as quantised and refuses to save it, although its tensors are plain
    # float32 after dequantisation: they are moved into a model built from the same config, with no such mark.
    config = copy.deepcopy(read.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(read.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    shutil.copyfile(packaged.verified_file(sources.WEIGHTS, "data/GEMMA_TERMS.html"), folder / "GEMMA_TERMS.html")
    log.info("gemma-3-270m dequantised from %s into %s (%d parameters, %.0f s)", gguf.name, folder,
             sum(p.numel() for p in model.parameters()), time.perf_counter() - started)


def base_folder(root: Path) -> Path:
    """The cached Hugging Face folder of the dequantised base (built on first use, about a minute)."""
    return cached_folder(Path(root), "base", base_key(), lambda folder: _build(Path(root), folder),
                         "the dequantised Gemma-3-270M")
