"""Upscaled models: the pretrained model with some modules replaced by routed mixtures of experts (WEMoE, E-WEMoE,
Rank-One MoE, SMILE) or routed by a preference vector (PWE-MoE). `blocks` holds the routed modules, `routers` their routers, `model` the swap and the size count
(`params ×`), `method` the base class that builds, trains (test-time entropy, in the core loop) and returns one."""

from mergebench_core.upscaling.blocks import (
    PreferenceBlock,
    RankOneBlock,
    SmileLinear,
    WeightEnsemblingBlock,
    set_batch_reduce,
    set_preference,
)
from mergebench_core.upscaling.method import TestTimeParams, UpscaleMethod, entropy_loss, summed_entropy
from mergebench_core.upscaling.model import (
    count_parameters,
    linear_layers,
    mlp_blocks,
    replace_module,
    size_report,
    task_arithmetic_into,
    task_vectors,
)
from mergebench_core.upscaling.routers import Router

__all__ = [
    "PreferenceBlock", "RankOneBlock", "Router", "SmileLinear", "TestTimeParams", "UpscaleMethod", "WeightEnsemblingBlock",
    "count_parameters", "entropy_loss", "linear_layers", "mlp_blocks", "replace_module", "set_batch_reduce", "set_preference",
    "size_report", "summed_entropy", "task_arithmetic_into", "task_vectors",
]
