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
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .merging import MergeStream

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
    return _first_in_order(x, count, descending=True)


def bottomk_mask(x: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the `count` smallest |x| entries; ties go to the earlier flat index."""
    return _first_in_order(x, count, descending=False)


def _first_in_order(x: torch.Tensor, count: int, descending: bool) -> torch.Tensor:
    flat = magnitude_bits(x).flatten()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=x.device)
    if count > 0:
        order = torch.argsort(flat, descending=descending, stable=True)
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


class OnePassTopK:
    """Exact top-`counts[r]` magnitude selection for each of R rows, decided during the merge pass itself.

    `StreamingTopK` needs two extra reads of every input before merging. This class needs none: a small sample of
    the task vectors (`from_sample`, about 1/64 of the entries) brackets each row's threshold, lo ≤ t ≤ hi, with a
    margin of `z` standard errors. During the merge pass `classify` settles every entry above hi (kept) and below lo
    (dropped) for good, and the caller `hold`s the few entries in between (the boundary, about 1% of a model) with
    whatever it needs to recompute them. Once every tensor has been seen, `resolve` picks exactly the right boundary
    entries (largest magnitudes first, the earlier entry on ties, as `topk_mask` does) and the caller patches its
    output there. If the exact counts show the sample misled the bracket, `resolve` returns False and the caller
    falls back to `StreamingTopK`: the answer is exact either way, only the speed depends on the sample.

    Masks come back as float32 0/1 tensors: torch's CPU comparisons that write floats run several times faster
    than those that write bools, and the caller multiplies by them anyway.
    """

    def __init__(self, counts: Iterable[int], lo: torch.Tensor, hi: torch.Tensor):
        self.counts = torch.tensor([int(c) for c in counts], dtype=torch.int64)
        self.lo = lo.to(torch.float32).reshape(-1, 1)
        self.hi = hi.to(torch.float32).reshape(-1, 1)
        self.above = torch.zeros(len(self.counts), dtype=torch.float64)
        self._held: list[tuple[torch.Tensor, torch.Tensor]] = []  # per ticket: (boundary mask, values), (R, m) each
        self._selected: list[torch.Tensor] | None = None

    @classmethod
    def from_sample(cls, stream: MergeStream, counts: Iterable[int], *, seed: int = 0, rate: float = 1 / 64,
                    chunk: int = 1024, z: float = 6.0) -> OnePassTopK:
        """Bracket each row's threshold from chunks of the stream's task vectors, sampled at `rate`.

        Tensors of at most 4 chunks are read whole; larger ones contribute max(2, ⌈rate·n/chunk⌉) random chunks.
        The count above a threshold is estimated per tensor (stratum) and summed; its standard error comes from
        the spread of the per-chunk fractions, so entries that are correlated within a chunk widen the bracket
        instead of breaking it.
        """
        counts = [int(c) for c in counts]
        gen = torch.Generator().manual_seed(seed)
        values, weights, strata = [], [], []  # strata: (first column, chunks, chunk length, n) of sampled tensors
        column = 0
        for key in stream.keys:
            n = torch.Size(stream.shape(key)).numel()
            if n == 0:
                continue
            if n <= 4 * chunk:
                sample = stream.task_vector_slices(key, [0], n).reshape(len(counts), n)
                weights.append(torch.ones(n, dtype=torch.float64))
            else:
                slots = n // chunk
                c = min(slots, max(2, math.ceil(rate * n / chunk)))
                starts = (torch.randperm(slots, generator=gen)[:c].sort().values * chunk).tolist()
                sample = stream.task_vector_slices(key, starts, chunk).reshape(len(counts), c * chunk)
                weights.append(torch.full((c * chunk,), n / (c * chunk), dtype=torch.float64))
                strata.append((column, c, chunk, n))
            values.append(sample.abs())
            column += sample.shape[1]
        x = torch.cat(values, 1)
        w = torch.cat(weights)
        lo, hi = torch.empty(len(counts)), torch.empty(len(counts))
        for r, k in enumerate(counts):
            lo[r], hi[r] = _bracket(x[r], w, strata, k, z)
        return cls(counts, lo, hi)

    def classify(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept, boundary) float 0/1 masks of a (R, m) block, in stream order; counts the kept entries."""
        mags = rows.abs()
        kept = torch.empty_like(mags)
        torch.gt(mags, self.hi, out=kept)
        boundary = torch.empty_like(mags)
        torch.ge(mags, self.lo, out=boundary)
        boundary -= kept  # hi >= lo, so kept entries are candidates too
        # float32 counts are exact below 2**24 entries a row, and summing them is 7x faster than into float64
        self.above += kept.sum(1) if rows.shape[1] < 1 << 24 else kept.sum(1, dtype=torch.float64)
        return kept, boundary

    def hold(self, values: torch.Tensor) -> int:
        """Keep some columns (R, m) of the stream, in stream order, to settle their boundary entries (those with
        lo ≤ |x| ≤ hi, as `classify` marked them) later; `values` must not change. Returns a ticket for `selected`."""
        mags = values.abs()
        self._held.append(((mags >= self.lo) & ~(mags > self.hi), values))
        return len(self._held) - 1

    def resolve(self) -> bool:
        """Choose the boundary entries to keep; False when the counts show the bracket missed the threshold."""
        rows = len(self.counts)
        boundary = torch.cat([b for b, _ in self._held], 1) if self._held else torch.zeros(rows, 0, dtype=torch.bool)
        need = self.counts - self.above.round().to(torch.int64)
        if bool(((need < 0) | (need > boundary.sum(1))).any()):
            return False
        chosen = torch.zeros_like(boundary)
        for r in range(rows):
            if need[r] > 0:
                columns = torch.nonzero(boundary[r]).view(-1)  # stream order: ticket, then column
                mags = torch.cat([values[r][b[r]] for b, values in self._held]).abs()  # same order as `columns`
                # larger magnitude first, then the earlier entry: one distinct int64 key per entry, so an unsorted
                # top-k (a selection, cheaper than the stable sort it equals) picks exactly the right set
                if len(mags) < 1 << 32:
                    earlier = torch.arange(len(mags) - 1, -1, -1, dtype=torch.int64)
                    key = (magnitude_bits(mags).to(torch.int64) << 32) | earlier
                    top = torch.topk(key, int(need[r]), sorted=False).indices
                else:  # pragma: no cover - more held entries than the key has room for
                    top = torch.argsort(mags, descending=True, stable=True)[: int(need[r])]
                chosen[r, columns[top]] = True
        self._selected = list(torch.split(chosen, [b.shape[1] for b, _ in self._held], 1))
        return True

    def selected(self, ticket: int) -> torch.Tensor:
        """Bool (R, m) mask of the held entries of `ticket` that are in the top-k (after a successful `resolve`)."""
        if self._selected is None:
            raise RuntimeError("resolve() has not succeeded yet")
        return self._selected[ticket]


def _bracket(x: torch.Tensor, w: torch.Tensor, strata: list[tuple[int, int, int, int]], k: int,
             z: float) -> tuple[float, float]:
    """(lo, hi) magnitudes such that, with high probability, at most k entries exceed hi and at least k reach lo."""
    total = float(w.sum())
    if k <= 0:
        return math.inf, math.inf  # nothing is kept, nothing is in doubt
    if k >= round(total):
        return -1.0, -1.0  # everything is kept
    values, weights = x.numpy(), w.numpy()
    top_half = values.view(np.int32) >> 16  # magnitudes are >= 0, so their bit patterns order like them
    from_top = np.cumsum(np.bincount(top_half, weights=weights, minlength=_HI)[::-1])

    def value_at(rank: float) -> float:
        """The magnitude that `rank` entries (in estimated count) reach: the bucket of the top 16 bits first, then
        an exact weighted order inside that one bucket, which keeps the sort small."""
        i = min(int(np.searchsorted(from_top, rank)), _HI - 1)
        inside = np.flatnonzero(top_half == _HI - 1 - i)
        inside = inside[np.argsort(-values[inside])]
        if len(inside) == 0:
            return 0.0
        reached = (from_top[i - 1] if i > 0 else 0.0) + np.cumsum(weights[inside])
        return float(values[inside[min(int(np.searchsorted(reached, rank)), len(inside) - 1)]])

    estimate = value_at(k)
    variance = 0.0
    for start, c, length, n in strata:
        frac = (x[start:start + c * length] > estimate).view(c, length).to(torch.float64).mean(1)
        variance += n * n * (1 - c * length / n) * float(frac.var()) / c
    # Rare events defeat the spread estimate (no sampled chunk may hold any of k = 7 entries): never trust it below
    # the Poisson variance of counting them with the sample's coarsest weight.
    if strata:  # (with no sampled tensor the "sample" is the whole model and the estimate is exact)
        variance = max(variance, float(w.max()) * (min(k, total - k) + 1))
    margin = z * math.sqrt(variance)
    hi = value_at(k - margin) if k - margin >= 1 else math.inf
    lo = value_at(k + margin) if k + margin < total else 0.0
    return lo, max(hi, lo)
