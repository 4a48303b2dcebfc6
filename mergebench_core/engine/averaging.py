"""Averages of tensors and state dicts: the one place where "the mean of the experts" is written.

Plain averaging is the fallback of nearly every method (tensors a statistic does not cover, the final step of fusion
after alignment, simple averaging itself), and it was written out in each of them, with the accumulation dtype chosen
anew every time. The dtype decides the last bits of the result, and the stored numbers of a method depend on those
bits, so it is a parameter here, never a silent choice:

- float32 (the default, what the data-free methods have always used): the experts are stacked in float32 and
  reduced there;
- float64: the sum of a few float32 tensors is exact in float64, so the mean is rounded once, when cast back. For two
  models both give the same bits (halving is exact, so rounding the sum and then halving equals rounding the mean);
  for three or more, float64 is the correctly rounded mean and float32 may differ from it in the last bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def mean_tensor(tensors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The entry-wise mean of `tensors` (one shape), accumulated and returned in `dtype`."""
    if not tensors:
        raise ValueError("the mean of no tensors is undefined; pass at least one")
    return torch.stack([t.to(dtype) for t in tensors]).mean(0)


def mean_state(states: Sequence[Mapping[str, torch.Tensor]], *, dtype: torch.dtype = torch.float32,
               keep: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The entry-wise mean of every floating tensor of `states` (accumulated in `dtype`, stored in the first state's
    dtype); other tensors (integer buffers such as step counters, which have no meaningful mean) come from `keep`,
    by default the first state."""
    if not states:
        raise ValueError("the mean of no state dicts is undefined; pass at least one")
    keep = states[0] if keep is None else keep
    return {k: mean_tensor([s[k] for s in states], dtype).to(v.dtype) if v.is_floating_point() else keep[k]
            for k, v in states[0].items()}


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ_t w_t x_t entry by entry, accumulated in `dtype` in the order given (a weighted average when the weights sum
    to one: see `normalized`)."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"a weighted sum needs one weight per tensor, got {len(weights)} weights for "
                         f"{len(tensors)} tensors")
    out = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for w, t in zip(weights, tensors):
        out += w * t.to(dtype)
    return out


def normalized(weights: Sequence[float]) -> list[float]:
    """The weights divided by their sum (as Python floats), so that a weighted sum becomes a weighted average."""
    total = float(sum(weights))
    if total == 0:
        raise ValueError(f"weights {list(weights)} sum to zero and cannot be normalized")
    return [float(w) / total for w in weights]


def inverse_norm_weights(states: Sequence[Mapping[str, torch.Tensor]], floor: float = 0.0) -> list[float]:
    """One weight per state, ∝ 1 / (‖S_t‖ + floor) with ‖S_t‖ the norm over all of the state's tensors (in float64),
    summing to one: a weighted average in which no state counts more merely because its values are larger (Fisher
    merging's normalisation of each expert's Fisher)."""
    norms = [float(torch.sqrt(sum((t.double() ** 2).sum() for t in s.values()))) for s in states]
    return normalized([1.0 / (n + floor) for n in norms])


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                  scales: Sequence[float] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ_t w_t x_t / Σ_t w_t entry by entry, in `dtype`: each tensor x_t weighted by its own tensor of weights W_t
    (a statistic, such as a Fisher diagonal), times a scalar `scales[t]` per tensor when given (w_t = s_t W_t).
    Entries whose weights sum to zero come out as NaN: floor the weights when that can happen. The result is cast to
    the first tensor's dtype."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"a weighted mean needs one weight tensor per tensor, got {len(weights)} for "
                         f"{len(tensors)} tensors")
    w = torch.stack([x.to(dtype) for x in weights])
    if scales is not None:
        w = torch.tensor(scales, dtype=dtype).view(-1, *[1] * (w.dim() - 1)) * w
    return ((w * torch.stack([t.to(dtype) for t in tensors])).sum(0) / w.sum(0)).to(tensors[0].dtype)
