"""RAM: Reinforced Agent Merging (arXiv:2601.13572), as MergeKit 0.1.5 runs it (`ram`, `ramplus_tl`; MergeKit PR
#662). Meant for task vectors that are sparse (RL-trained agents update few weights): an entry of τ_t counts as
updated when |τ_t| > ε, and per entry

- `ram`: an entry updated by one expert takes that expert's update whole; an entry updated by several takes their
  mean; θ = θ_0 + Σ_t [updated_t] τ_t / max(c, 1), c the number of experts that updated it. No scaling factor:
  unique updates are not diluted by averaging with experts that left the entry alone.
- `ramplus_tl` (RAM+, tensor-local, MergeKit's name): the unique updates of expert t are further multiplied by
  λ_t = 1 + r · clip(ρ_t, 0, α), ρ_t = (its updated entries shared with another expert) / (its unique ones), both
  counted over the tensor: an expert whose updates mostly overlap others' gets its few unique ones amplified.

Defaults are MergeKit's: ε = 1e-5, r = 0.1, α = 0.2. On dense task vectors (every expert moves every weight, as
on this benchmark's pools) RAM reduces to the mean of the task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.engine.data_free import TaskVectorMethod


@dataclass
class Params:
    epsilon: float = 1e-5
    """An entry counts as updated by an expert when |τ_t| exceeds this."""

    def __post_init__(self) -> None:
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")


@dataclass
class PlusParams(Params):
    r: float = 0.1
    """How strongly an expert's overlap ratio amplifies its unique updates."""
    alpha: float = 0.2
    """Cap on the overlap ratio ρ_t."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


def updates(taus: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(which entries each expert updated, as 0/1 floats (T, n); how many experts updated each entry (n,))."""
    updated = (taus.abs() > epsilon).to(taus.dtype)
    return updated, updated.sum(0)


class Ram(TaskVectorMethod):
    """Unique updates kept whole, shared updates averaged over the experts that made them."""

    name = "ram"
    Params = Params
    info = MethodInfo(kind="merge", data="none")
    blockwise = True  # every entry is merged from that entry alone

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        updated, count = updates(taus, self.params.epsilon)
        merged = (taus * updated).sum(0) / count.clamp(min=1)
        return base.to(torch.float32) + merged


class RamPlus(Ram):
    """RAM with each expert's unique updates amplified by how much of its update overlaps others' (per tensor)."""

    name = "ramplus_tl"
    Params = PlusParams
    blockwise = False  # the overlap ratio is counted over the whole tensor

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        p = self.params
        flat = taus.reshape(len(taus), -1)
        updated, count = updates(flat, p.epsilon)
        unique = (count == 1).to(flat.dtype)
        shared = (count > 1).to(flat.dtype)
        rho = (updated * shared).sum(1) / (updated * unique).sum(1).clamp(min=p.epsilon)
        amplify = 1.0 + p.r * rho.clamp(min=0.0, max=p.alpha)
        kept = flat * updated
        merged = (kept * unique * amplify.view(-1, 1)).sum(0) + (kept * shared).sum(0) / count.clamp(min=1)
        return base.to(torch.float32) + merged.view(base.shape)


@hookimpl
def register_methods(register):
    register(Ram)
    register(RamPlus)
