"""CLIP model pools for mergebench.

- `clip-vit-<size>_<suite>` (size b32, b16, l14; suite TA8, TA14, TA20): FusionBench's Hugging Face checkpoints,
  `openai/clip-vit-*` and `tanganke/clip-vit-*_<task>`; scored by `clip-zeroshot-vit-<size>_<suite>`.
- `openclip-vit-<size>_TA8`: the task-vectors paper's OpenCLIP checkpoints from $MERGEBENCH_OPENCLIP_DIR; scored by
  `openclip-zeroshot-vit-<size>_TA8` with the release's heads.
"""

from __future__ import annotations

from functools import partial

from mergebench_core import hookimpl
from mergebench_clip_tasks import BASE_MODELS, SUITES, suite

from .hf_pool import CLIPVisionPool
from .openclip_pool import ARCHS, OpenCLIPPool, OpenCLIPTaskPool

__all__ = ["CLIPVisionPool", "OpenCLIPPool", "OpenCLIPTaskPool"]


@hookimpl
def register_modelpools(register):
    for size, base in BASE_MODELS.items():
        for suite_name in SUITES:
            register(f"clip-vit-{size}_{suite_name}", partial(CLIPVisionPool, size, suite_name),
                     f"{base} and its {len(suite(suite_name))} FusionBench experts (vision tower; Hugging Face hub)")
    for size, arch in ARCHS.items():
        register(f"openclip-vit-{size}_TA8", partial(OpenCLIPPool, size),
                 f"OpenCLIP {arch} task-vectors checkpoints from $MERGEBENCH_OPENCLIP_DIR (pickles: --trust-pickle)")


@hookimpl
def register_taskpools(register):
    for size, arch in ARCHS.items():
        register(f"openclip-zeroshot-vit-{size}_TA8", partial(OpenCLIPTaskPool, size),
                 f"TA8 scored with the task-vectors release's {arch} heads")
