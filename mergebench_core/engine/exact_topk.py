"""Exact magnitude top-k: masks over a tensor in memory, a radix select over a model streamed tensor by tensor,
and the thresholds that apply a selection to blocks of any size.

Keep-the-largest-k masks are the first step of TIES, DARE-TIES, Breadcrumbs and friends. Two rules make them
exact and reproducible: exactly `count` entries are kept (never more because of ties), and among entries of equal
magnitude the one that comes first (in key order, then flat index) is kept.

The whole-model threshold is found without holding the model: the bit pattern of a non-negative float32 orders
like its value, so a radix select over two passes (a histogram of the high 16 bits, then of the low 16 bits inside
the one bucket that holds the k-th value) yields the exact k-th largest magnitude (`StreamingTopK`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

HIGH_BUCKETS = 1 << 15
"""Buckets of a radix select's first pass: |x| has a zero sign bit, so the high 16 bits of its pattern are below
2**15."""
_LO = 1 << 16
_INT32_MAX = (1 << 31) - 1


def keep_count(fraction: float, n: int) -> int:
    """How many of n entries a `fraction` of them is: ⌊fraction·n⌋ (with a guard against 0.29·100 = 28.99...)."""
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
        self.hi_hist = torch.zeros(rows, HIGH_BUCKETS, dtype=torch.int64)
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
        hi += self._row_offsets(HIGH_BUCKETS, hi.device)
        counted = torch.bincount(hi.view(-1), minlength=len(self.counts) * HIGH_BUCKETS)
        self.hi_hist += counted.view(-1, HIGH_BUCKETS).cpu()

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
            from_top = torch.flip(self.hi_hist[r], [0]).cumsum(0)  # from_top[i]: entries in buckets >= HIGH_BUCKETS-1-i
            i = int(torch.searchsorted(from_top, torch.tensor(count)))
            b = HIGH_BUCKETS - 1 - i
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

    def thresholds(self) -> Thresholds:
        """The exact selection as `Thresholds` (for blocks in the order they were observed)."""
        self._find_thresholds()
        cut, take, equal = [], [], []
        for r, bits in enumerate(self.threshold):
            if bits < 0:  # keeps nothing
                cut.append(math.inf)
                take.append(0)
                equal.append(0)
                continue
            b, low = bits >> 16, bits & 0xFFFF
            cut.append(float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)))
            take.append(self.take_at_threshold[r])
            equal.append(int(self.lo_hist[r, low]) if b == self.bucket[r] else 0)
        return Thresholds(torch.tensor(cut, dtype=torch.float32), take, equal)


class Thresholds:
    """An exact top-`count` selection per row, as thresholds: keep |x| > t, and of the entries with |x| = t the
    first `take` in stream order (of the `equal` there are). `mask` applies it to chunks given in stream order, so a
    model or a tensor can be streamed in blocks of any size and gets the same mask as `topk_mask` over the whole.

    Where the kept equal entries end is known, for thresholds from `find_thresholds`, as a range of stream columns
    per row (`ends`: before `a` all equal entries are kept, from `b` on none, and the first `rem` of those in
    [a, b)); `mask` then needs the stream column of each chunk (`start`) and costs one comparison per entry.
    Without it (`StreamingTopK.thresholds`), chunks must come in order and equal entries are counted as they pass.
    """

    def __init__(self, t: torch.Tensor, take: Sequence[int], equal: Sequence[int],
                 ends: dict[int, tuple[int, int, int]] | None = None):
        self.t = t.to(torch.float32).reshape(-1)
        self.take = [int(x) for x in take]
        self.equal = [int(x) for x in equal]
        # a row that takes every entry equal to t compares with ">= t", written "> the float below t"
        below = torch.nextafter(self.t, torch.full_like(self.t, -math.inf))
        ordered = [0 < tk < eq for tk, eq in zip(self.take, self.equal)]
        self._cut = torch.where(torch.tensor([tk == eq for tk, eq in zip(self.take, self.equal)]), below,
                                self.t).view(-1, 1)
        self._below = below.view(-1, 1)
        self.ends = {r: e for r, e in (ends or {}).items() if ordered[r]}
        self._remaining = [tk if o and r not in self.ends else 0
                           for r, (tk, o) in enumerate(zip(self.take, ordered))]
        self._left = {r: e[2] for r, e in self.ends.items()}  # of `rem`, still to keep inside [a, b)
        self._device_cut: dict[torch.device, torch.Tensor] = {}

    def mask(self, mags: torch.Tensor, out: torch.Tensor | None = None, start: int | None = None) -> torch.Tensor:
        """Float 0/1 keep-mask of a chunk of magnitudes (R, m), in stream order (float masks multiply faster);
        `start` is its first stream column (needed when `ends` is known)."""
        cut = self._device_cut.get(mags.device)
        if cut is None:
            cut = self._device_cut[mags.device] = self._cut.to(mags.device)
        width = mags.shape[1]
        fix = []
        if self.ends:
            if start is None:
                raise ValueError("these thresholds need the stream column of each chunk")
            cut = cut.clone()
            for r, (a, b, _) in self.ends.items():
                if start + width <= a:  # every equal entry here is kept
                    cut[r] = self._below[r]
                elif start < b:  # the chunk reaches [a, b): mended below
                    fix.append(r)
        out = torch.gt(mags, cut, out=out if out is not None else torch.empty_like(mags))
        for r in fix:
            a, b, _ = self.ends[r]
            lo_col, hi_col = max(a - start, 0), min(b - start, width)
            if lo_col > 0:
                torch.gt(mags[r, :lo_col], self._below[r].item(), out=out[r, :lo_col])
            left = self._left[r]
            if left > 0 and hi_col > lo_col:
                equal = torch.nonzero(mags[r, lo_col:hi_col] == self.t[r].item()).view(-1)[:left]
                out[r, lo_col + equal] = 1.0
                self._left[r] = left - int(equal.numel())
        for r, left in enumerate(self._remaining):
            if left > 0:  # no known end: the first `take` equal entries, counted as they pass
                equal = torch.eq(mags[r], self.t[r].item(), out=torch.empty_like(mags[r]))
                here = int(equal.sum())
                if here <= left:  # all of this chunk's: no need to find them
                    out[r] += equal
                    self._remaining[r] -= here
                else:
                    at = torch.nonzero(equal).view(-1)[:left]
                    out[r, at] = 1.0
                    self._remaining[r] = 0
        return out


def kth_largest(blocks: Callable[[], Iterable[torch.Tensor]], ranks: Sequence[int]) -> list[float]:
    """The exact `ranks[r]`-th largest *signed* value (1 = the maximum) of each of R rows, streamed.

    `blocks()` yields the rows a chunk at a time, (R, m), in the same order on every call; it is called two or four
    times (each call is a pass over the model). A quantile of a score that can be negative (PCB's balancing score)
    is found with the magnitude radix select on the positive parts, and, for a row whose answer is negative, on the
    negative parts: the k-th largest of v is the (d − k + 1)-th largest of −v, negated.
    """
    ranks = [int(k) for k in ranks]
    rows = len(ranks)
    if rows == 0:
        return []
    select = StreamingTopK(ranks)
    positive = torch.zeros(rows, dtype=torch.int64)
    zero = torch.zeros(rows, dtype=torch.int64)
    total = 0
    for chunk in blocks():
        chunk = chunk.to(torch.float32).reshape(rows, -1)
        positive += (chunk > 0).sum(1).cpu()
        zero += (chunk == 0).sum(1).cpu()
        total += chunk.shape[1]
        select.observe_high(torch.relu(chunk))
    for k in ranks:
        if not 1 <= k <= total:
            raise ValueError(f"rank {k} is outside 1..{total}, the entries per row")
    for chunk in blocks():
        select.observe_low(torch.relu(chunk.to(torch.float32).reshape(rows, -1)))
    select._find_thresholds()
    out = [float(torch.tensor([b], dtype=torch.int32).view(torch.float32)) for b in select.threshold]
    below = [r for r, k in enumerate(ranks) if k > int(positive[r]) + int(zero[r])]
    for r, k in enumerate(ranks):
        if int(positive[r]) < k <= int(positive[r]) + int(zero[r]):
            out[r] = 0.0
    if below:
        negative = StreamingTopK([total - ranks[r] + 1 if r in below else 0 for r in range(rows)])
        for chunk in blocks():
            negative.observe_high(torch.relu(-chunk.to(torch.float32).reshape(rows, -1)))
        for chunk in blocks():
            negative.observe_low(torch.relu(-chunk.to(torch.float32).reshape(rows, -1)))
        negative._find_thresholds()
        for r in below:
            out[r] = -float(torch.tensor([negative.threshold[r]], dtype=torch.int32).view(torch.float32))
    return out
