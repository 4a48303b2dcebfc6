"""`lora_task_arithmetic`: task arithmetic on LoRA experts in factored form, the merged adapter kept as a peft folder.

θ = θ_0 + λ Σ_t s_t·B_t·A_t, the same model `task_arithmetic` makes from the materialised deltas, but merged on the
factors (`lora_factored`), so the result is also a LoRA adapter of the base that can be shipped or loaded by peft
on its own. It runs on pools whose experts are all LoRA adapters (`LoraAdapterPool`) and is refused elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import nn

from mergebench_core import Method, MethodInfo, MergeOutput, ModelPool, RunContext

from .lora_factored import task_arithmetic_adapter


@runtime_checkable
class LoraAdapterPool(Protocol):
    """A model pool whose experts may be peft LoRA adapters of its pretrained model."""

    def adapter_folder(self, name: str) -> Path | None: ...

    def with_adapter(self, folder: str | Path) -> nn.Module: ...


@dataclass
class Params:
    scaling_factor: float = 0.3
    """λ, the weight of the summed adapter deltas (task_arithmetic's default)."""


class LoraTaskArithmetic(Method):
    name = "lora_task_arithmetic"
    Params = Params
    info = MethodInfo(kind="merge", data="none", task_vectors=True)

    @classmethod
    def refusal(cls, pool: ModelPool, params: Params) -> str | None:
        if not isinstance(pool, LoraAdapterPool) or not pool.expert_names or \
                any(pool.adapter_folder(e) is None for e in pool.expert_names):
            return (f"it merges LoRA adapters in factored form, and the experts of pool {pool.name!r} are not all "
                    f"peft LoRA adapters; task_arithmetic merges their materialised deltas")
        return super().refusal(pool, params)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        assert isinstance(pool, LoraAdapterPool)
        experts = list(pool.expert_names)
        folders = [pool.adapter_folder(e) for e in experts]
        key = hashlib.sha256(json.dumps([[pool.identity(e) for e in experts], self.params.scaling_factor,
                                         ctx.method_version]).encode()).hexdigest()[:16]
        out = Path(ctx.cache_dir) / "lora-merges" / f"{self.name}-{key}"
        task_arithmetic_adapter([f for f in folders if f is not None], out, self.params.scaling_factor)
        ctx.log.info("merged adapter written to %s", out)
        return MergeOutput(pool.with_adapter(out), extras={"adapter": str(out)})
