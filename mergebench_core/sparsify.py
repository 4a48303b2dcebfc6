"""Exact magnitude top-k selection, per tensor or over a whole model streamed tensor by tensor.

Keep-the-largest-k masks are the first step of TIES, DARE-TIES, Breadcrumbs and friends. Two rules make them
exact and reproducible: exactly `count` entries are kept (never more because of ties), and among entries of equal
magnitude the one that comes first (in key order, then flat index) is kept.

The whole-model threshold is found without holding the model: the bit pattern of a non-negative float32 orders
like its value, so a radix select over two passes (a histogram of the high 16 bits, then of the low 16 bits inside
the one bucket that holds the k-th value) yields the exact k-th largest magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

_HI = 1 << 15  # |x| has a zero sign bit, so the high 16 bits of its pattern are below 2**15
_LO = 1 << 16
_INT32_MAX = (1 << 31) - 1


def keep_count(fraction: float, n: int) -> int:
    """How many of n entries a density `fraction` keeps: ⌊fraction·n⌋ (with a guard against 0.29·100 = 28.99...)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a kept fraction must be in [0, 1], got {fraction}")
    return min(n, math.floor(fraction * n + 1e-9 * max(n, 1)))


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |x| as float32; they compare exactly like the magnitudes."""
    return x.detach().to(torch.float32).abs().contiguous().view(torch.int32)


def topk_mask(x: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the `count` largest |x| entries; ties go to the earlier flat index."""
    flat = magnitude_bits(x).flatten()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=x.device)
    if count > 0:
        order = torch.argsort(flat, descending=True, stable=True)
        mask[order[:count]] = True
    return mask.view(x.shape)


def bottomk_mask(x: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the `count` smallest |x| entries; ties go to the earlier flat index."""
    flat = magnitude_bits(x).flatten()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=x.device)
    if count > 0:
        order = torch.argsort(flat, descending=False, stable=True)
        mask[order[:count]] = True
    return mask.view(x.shape)


class StreamingTopK:
    """Exact top-`counts[r]` magnitude selection for each of R rows of a model streamed tensor by tensor.

    Use: call `observe_high` on every tensor (pass 1), then `observe_low` on every tensor (pass 2), then `mask`
    on every tensor *in the same order* (the merge pass). Each tensor is given as (R, *shape): one slice per row
    (per task vector).
    """

    def __init__(self, counts: Iterable[int]):
        self.counts = [int(c) for c in counts]
        rows = len(self.counts)
        self.hi_hist = torch.zeros(rows, _HI, dtype=torch.int64)
        self.lo_hist = torch.zeros(rows, _LO, dtype=torch.int64)
        self.bucket: list[int] = []
        self.above_bucket: list[int] = []
        self.threshold: list[int] = []  # exact bit pattern of the count-th largest magnitude, -1 when count is 0
        self.take_at_threshold: list[int] = []

    def observe_high(self, rows: torch.Tensor) -> None:
        # One bincount over all rows at once: row r's high halves are shifted into bins [r·2^15, (r+1)·2^15).
        # int32 indices are counted directly (converting to int64 first would double the memory traffic).
        bits = magnitude_bits(rows).reshape(len(self.counts), -1)
        hi = bits >> 16
        hi += self._row_offsets(_HI, hi.device)
        self.hi_hist += torch.bincount(hi.view(-1), minlength=len(self.counts) * _HI).view(-1, _HI).cpu()

    def _row_offsets(self, width: int, device: torch.device) -> torch.Tensor:
        return (torch.arange(len(self.counts), dtype=torch.int32, device=device) * width).view(-1, 1)

    def _find_buckets(self) -> None:
        if self.bucket:
            return
        for r, count in enumerate(self.counts):
            if count <= 0:
                self.bucket.append(-1)
                self.above_bucket.append(0)
                continue
            from_top = torch.flip(self.hi_hist[r], [0]).cumsum(0)  # from_top[i]: entries in buckets >= _HI-1-i
            i = int(torch.searchsorted(from_top, torch.tensor(count)))
            b = _HI - 1 - i
            self.bucket.append(b)
            self.above_bucket.append(int(from_top[i - 1]) if i > 0 else 0)

    def observe_low(self, rows: torch.Tensor) -> None:
        self._find_buckets()
        bits = magnitude_bits(rows).reshape(len(self.counts), -1)
        if bits.shape[1] == 0:
            return
        # rows without a bucket (count 0) carry -1, which no high half (always >= 0) equals
        buckets = torch.tensor(self.bucket, dtype=torch.int32, device=bits.device).view(-1, 1)
        inside = torch.nonzero(((bits >> 16) == buckets).view(-1)).squeeze(1)
        if inside.numel():
            row = torch.div(inside, bits.shape[1], rounding_mode="floor")
            low = (bits.view(-1)[inside] & 0xFFFF).long() + row * _LO
            self.lo_hist += torch.bincount(low, minlength=len(self.counts) * _LO).view(-1, _LO).cpu()

    def _find_thresholds(self) -> None:
        if self.threshold:
            return
        self._find_buckets()
        for r, count in enumerate(self.counts):
            b = self.bucket[r]
            if b < 0:
                self.threshold.append(-1)
                self.take_at_threshold.append(0)
                continue
            need = count - self.above_bucket[r]
            from_top = torch.flip(self.lo_hist[r], [0]).cumsum(0)
            i = int(torch.searchsorted(from_top, torch.tensor(need)))
            low = _LO - 1 - i
            above = int(from_top[i - 1]) if i > 0 else 0
            self.threshold.append((b << 16) | low)
            self.take_at_threshold.append(need - above)

    def mask(self, rows: torch.Tensor) -> torch.Tensor:
        """The keep-mask of this tensor's rows; tensors must come in the order they were observed."""
        self._find_thresholds()
        bits = magnitude_bits(rows).reshape(len(self.counts), -1)
        # a row that keeps nothing compares against INT32_MAX, which no magnitude pattern exceeds
        thresholds = torch.tensor([t if t >= 0 else _INT32_MAX for t in self.threshold], dtype=torch.int32,
                                  device=bits.device).view(-1, 1)
        out = bits > thresholds
        for r, thr in enumerate(self.threshold):
            if thr >= 0 and self.take_at_threshold[r] > 0:
                equal = torch.nonzero(bits[r] == thr).flatten()[: self.take_at_threshold[r]]
                out[r][equal] = True
                self.take_at_threshold[r] -= int(equal.numel())
        return out.view(rows.shape)
