"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

Each linear weight (`nn.Linear`, or transformers' `Conv1D`, GPT-2's, which stores it (in, out)) and each
convolution kernel (nn.Conv1d/Conv2d with groups = 1, on its matrix view out × (in · prod(k)), whose inputs are the
unfolded patches at every output position) is the least-squares merge of the experts' layers on their own inputs:
W = (Σ_t G_t)⁻¹ Σ_t G_t W_t (in the (in, out) layout), with G_t = XᵀX / n the Gram matrix of the layer's inputs
under expert t on its task's training data. Off-diagonal entries of each G_t are scaled by
α = `reduce_non_diagonal_ratio`, which interpolates between that closed form (α = 1) and a per-input-feature
weighted average (α = 0). Every other floating tensor (biases, norms, embeddings) is the plain average; a
convolution whose patches cannot be unfolded (grouped, 3-D, transposed) is averaged too, with a warning and a count
in the result's extras (`fallback_tensors`: the statistic merges' fallback rule). Batch-norm running statistics follow the run's `bn_stats` rule.

Defaults and where they come from:
- `n_examples` = 256: FusionBench's `num_regmean_examples` for CLIP (the paper uses up to 1,000).
- `reduce_non_diagonal_ratio` = 0.95: FusionBench's CLIP configuration (its GPT-2 configuration uses 0.6).
- `exclude_param_names_regex` = []: tensors whose names match (re.match) are not merged and keep the pretrained
  value (the first expert's when the pool has none), as FusionBench leaves them untouched in its pretrained copy.
The Grams come from the shared statistics cache, so a sweep over α computes them once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mergebench_core import hookimpl
from mergebench_core.data.statistic_merge import StatisticMerge, StatisticParams, StatisticRun
from mergebench_core.data.statistics import gram_convolutions, linear_layers, weight_is_transposed

log = logging.getLogger(__name__)


@dataclass
class Params(StatisticParams):
    reduce_non_diagonal_ratio: float = 0.95
    """α: off-diagonal Gram entries are multiplied by it (1: exact regression, 0: diagonal-weighted average)."""
    exclude_param_names_regex: list[str] = field(default_factory=list)
    """Tensors whose names match any pattern keep the pretrained value."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.reduce_non_diagonal_ratio <= 1.0:
            raise ValueError(f"reduce_non_diagonal_ratio must be in [0, 1], got {self.reduce_non_diagonal_ratio}")


def reduce_non_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """G with its off-diagonal entries multiplied by `ratio` and its diagonal unchanged."""
    diag = torch.diagonal(gram)
    return ratio * gram + (1.0 - ratio) * torch.diag_embed(diag)


def regmean_weight(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], ratio: float,
                   transposed: bool = False) -> torch.Tensor:
    """The RegMean merge of Linear weights (out, in) given each expert's input Gram (in, in), solved in float64.
    `transposed`: the weights are stored (in, out) (`Conv1D`), and so is the result. Convolution kernels
    (out, in, *k) are solved on their matrix view (out, in · prod(k)), with Grams of the unfolded patches, and
    reshaped back."""
    if transposed:
        return regmean_weight([w.T for w in weights], grams, ratio).T.contiguous()
    if weights[0].dim() > 2:
        shape = weights[0].shape
        return regmean_weight([w.reshape(shape[0], -1) for w in weights], grams, ratio).reshape(shape)
    reduced = [reduce_non_diagonal(g.double(), ratio) for g in grams]
    lhs = sum(reduced)
    rhs = sum(g @ w.double().T for g, w in zip(reduced, weights))
    try:
        solution = torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # a singular sum (inputs that never vary): least squares instead of an exact solve
        log.warning("singular Gram sum; using the pseudo-inverse")
        solution = torch.linalg.pinv(lhs) @ rhs
    return solution.T.to(weights[0].dtype)


def excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(re.match(p, name) for p in patterns)


def weight_key(module: str) -> str:
    """The state-dict key of a module's weight ("weight" for a model that is itself one layer)."""
    return f"{module}.weight" if module else "weight"


class RegMean(StatisticMerge):
    """Merge every Linear layer and convolution by least squares on the experts' own layer inputs; average the
    rest."""

    name = "regmean"
    Params = Params
    covered_extra = "regressed"
    transposed: Collection[str] = ()
    """Modules that store their weight (in, out) (`Conv1D`, see `statistics.weight_is_transposed`)."""

    def statistic(self, run: StatisticRun, model: nn.Module, expert: str, task: str) -> dict[str, torch.Tensor]:
        return run.grams(expert, task, convolutions=bool(gram_convolutions(model)[0]))

    def prepare(self, run: StatisticRun, model: nn.Module, stats: list[Mapping[str, torch.Tensor]]
                ) -> dict[str, Any]:
        self.transposed = {n for n, m in linear_layers(model).items() if weight_is_transposed(m)}
        return {}

    def base_state(self, run: StatisticRun) -> dict[str, torch.Tensor]:
        return run.pool.state_dict(run.base_name)

    def entry(self, key: str, statistic: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        module, _, local = key.rpartition(".")  # module "" for a model that is itself a Linear
        return statistic.get(module) if local == "weight" else None

    def kept(self, key: str) -> bool:
        return excluded(key, self.params.exclude_param_names_regex)

    def refused(self, model: nn.Module) -> dict[str, tuple[str, str]]:
        """Convolutions whose input patches are not unfolded (grouped, 3-D, transposed): averaged and counted."""
        refused = {}
        for name, why in gram_convolutions(model)[1].items():
            reason = why.split(" (")[0]
            refused[weight_key(name)] = (reason, why[len(reason):])
        return refused

    def merge_tensor(self, key: str, tensors: list[torch.Tensor], grams: list[torch.Tensor],
                     base: torch.Tensor | None) -> torch.Tensor:
        return regmean_weight(tensors, grams, self.params.reduce_non_diagonal_ratio,
                              transposed=key.rpartition(".")[0] in self.transposed)


def regmean_merge(states: Sequence[Mapping[str, torch.Tensor]], grams: Sequence[Mapping[str, torch.Tensor]],
                  ratio: float, exclude: Sequence[str] = (), keep: Mapping[str, torch.Tensor] | None = None,
                  transposed: Collection[str] = ()) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Merge `states`: Linear weights (modules named in `grams`) by RegMean, other floats by the mean, excluded
    tensors from `keep` (default: the first state). Modules in `transposed` store their weight (in, out) (`Conv1D`,
    see `mergebench_core.data.statistics.weight_is_transposed`). Returns the merged dict and the names merged by
    regression."""
    method = RegMean(Params(reduce_non_diagonal_ratio=ratio, exclude_param_names_regex=list(exclude)))
    method.transposed = set(transposed)
    return method.merge_states(states, grams, base=keep)


@hookimpl
def register_methods(register):
    register(RegMean)
