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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

_CHUNK = 1 << 19  # entries (over all rows) compared at once: the temporaries stay in cache
_FLUSH = 1 << 20  # magnitudes inside a bracket kept per row before they become a histogram
_MAX_BINS = 1 << 20  # the most bit patterns such a histogram spans (8 MiB per row)
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


def _nonzero_sparse(flags: torch.Tensor) -> torch.Tensor:
    """Indices of the non-zero entries of a flat tensor in which they are rare. As bools, 8 entries make one int64
    word: `torch.nonzero` scans the words (an eighth of the entries) and then only the words that hold any, which is
    several times faster than scanning every entry (about a nanosecond each)."""
    b = flags.bool()
    full = b.numel() // 8 * 8
    words = torch.nonzero(b[:full].view(torch.int64)).view(-1)
    local = torch.nonzero(b[:full].view(-1, 8).index_select(0, words).view(-1)).view(-1)
    at = words[local >> 3] * 8 + (local & 7)
    if full < b.numel():
        at = torch.cat([at, torch.nonzero(b[full:]).view(-1) + full])
    return at


@dataclass
class Sample:
    """Magnitudes sampled from each row, (R, s), with per-entry weights (s,) (entries each stands for) and the
    strata that `bracket` needs: (first column, chunks, chunk length, entries of the tensor) per sampled tensor."""

    values: torch.Tensor
    weights: torch.Tensor
    strata: list[tuple[int, int, int, int]]


def sample_plan(n: int, generator: torch.Generator, rate: float = 1 / 64, chunk: int = 1024) -> tuple[list[int], int]:
    """(chunk starts, chunk length) to sample from a tensor of n entries: the whole tensor when it has at most 4
    chunks, else max(2, ⌈rate·n/chunk⌉) random chunks."""
    if n <= 4 * chunk:
        return [0], n
    slots = n // chunk
    c = min(slots, max(2, math.ceil(rate * n / chunk)))
    return (torch.randperm(slots, generator=generator)[:c].sort().values * chunk).tolist(), chunk


def build_sample(parts: Iterable[tuple[torch.Tensor, int, int]]) -> Sample:
    """A `Sample` from (magnitudes (R, c·L), chunks c, tensor entries n) per tensor; c = 1 with c·L = n means the
    tensor was read whole."""
    values, weights, strata, column = [], [], [], 0
    for mags, c, n in parts:
        width = mags.shape[1]
        if width == 0:
            continue
        values.append(mags.to("cpu", torch.float32))
        weights.append(torch.full((width,), n / width, dtype=torch.float64))
        if width < n:
            strata.append((column, c, width // c, n))
        column += width
    if not values:
        return Sample(torch.zeros(0, 0), torch.zeros(0, dtype=torch.float64), [])
    return Sample(torch.cat(values, 1), torch.cat(weights), strata)


@dataclass
class Bracket:
    """Per row: lo <= t <= hi, and up to a few `levels`, magnitudes strictly between lo and hi that the sample saw
    at least three times (NaN padding). A level is counted, not stored, by the counting pass: quantised inputs (bf16
    task vectors) put whole runs of equal magnitudes inside a bracket."""

    lo: torch.Tensor
    hi: torch.Tensor
    levels: torch.Tensor


MAX_LEVELS = 0
"""Levels counted per row (off: on bf16 Llama-shaped inputs counting two levels cost more than storing them)."""


def bracket_thresholds(counts: Sequence[int], sample: Sample, z: float = 6.0) -> Bracket:
    """The `Bracket` of each row: with high probability at most counts[r] entries exceed hi[r] and at least
    counts[r] reach lo[r], estimated from `sample` with a margin of `z` standard errors (`_bracket`)."""
    rows = len(counts)
    lo, hi = torch.full((rows,), -1.0), torch.full((rows,), -1.0)
    levels = torch.full((rows, MAX_LEVELS), math.nan)
    if sample.values.numel():
        if len(sample.strata) <= 1 and len(sample.values[0]) > 0 and bool((sample.weights == sample.weights[0]).all()):
            lo, hi = _bracket_uniform(sample, counts, z)  # one tensor: every row at once
        else:
            for r, k in enumerate(counts):
                lo[r], hi[r] = _bracket(sample.values[r], sample.weights, sample.strata, int(k), z)
        for r in range(rows if MAX_LEVELS else 0):
            x = sample.values[r]
            inside = x[(x > lo[r]) & (x < hi[r])]
            if inside.numel() > 1:
                values, seen = torch.unique(inside, return_counts=True)
                heavy = values[seen >= 3][torch.argsort(seen[seen >= 3], descending=True)][:MAX_LEVELS]
                levels[r, :len(heavy)] = heavy
    used = int((~torch.isnan(levels)).sum(1).max()) if rows else 0
    return Bracket(lo, hi, levels[:, :used])


def find_thresholds(counts: Sequence[int], sample: Sample | Bracket, blocks: Callable[[], Iterable[torch.Tensor]],
                    z: float = 6.0, repeat: int = 1) -> tuple[Thresholds, bool]:
    """Exact top-`counts[r]` thresholds of R rows streamed as blocks of values (R / repeat, m) by `blocks()`: row r
    ranks the magnitudes of data row r mod (R / repeat) (so two selections of different counts can share the data).

    The sample brackets each row's threshold, lo <= t <= hi, `z` standard errors wide; one pass over the blocks counts
    the entries above hi, equal to hi, to lo and to each heavy level, and keeps the other magnitudes inside the bracket
    (a few per thousand), from which the exact t, and how many entries equal to it are kept, follow. Should the
    counts show the bracket missed, a two-pass radix select (`StreamingTopK`) finds the thresholds instead: exact
    either way. Returns (thresholds, whether the bracket held). `sample` may also be the `Bracket` of
    `bracket_thresholds`, so that a large sample can be freed first.
    """
    rows = len(counts)
    bracket = sample if isinstance(sample, Bracket) else bracket_thresholds(counts, sample, z)
    lo, hi, levels = bracket.lo, bracket.hi, bracket.levels
    n_levels = levels.shape[1]
    above = torch.zeros(rows, dtype=torch.int64)  # entries > hi
    # The light magnitudes strictly between lo and hi are kept, chunk by chunk, row-major within a chunk, with how
    # many each row has per chunk (so each row's come in stream order); the bracket's width in ranks bounds them to a
    # few per thousand entries. Per chunk, the entries equal to hi, to lo and to each level are counted: from these
    # counts follows where the kept entries equal to the threshold end.
    inside: list[list[torch.Tensor]] = [[] for _ in range(rows)]  # per row, in stream order
    # A row whose kept magnitudes pile up (a large model: the bracket's width in ranks grows with it) turns them into
    # a histogram of their bit patterns once they pass _FLUSH, when its bracket spans at most _MAX_BINS patterns
    # (magnitudes order like their patterns): memory stays bounded, and the exact threshold follows all the same.
    first_bin = (lo.view(torch.int32).to(torch.int64) + 1).tolist()
    bins = [int(b) - f if 0 <= lo[r] < hi[r] < math.inf else 0
            for r, (b, f) in enumerate(zip(hi.view(torch.int32).tolist(), first_bin))]
    hist: dict[int, torch.Tensor] = {}
    stored = [0] * rows

    def flush(r: int) -> None:
        patterns = torch.cat(inside[r]).view(torch.int32).to(torch.int64) - first_bin[r]
        counted = torch.bincount(patterns, minlength=bins[r])
        hist[r] = hist[r] + counted if r in hist else counted
        inside[r], stored[r] = [], 0

    per_chunk: list[torch.Tensor] = []  # (rows,) count of kept inside magnitudes, per chunk
    chunks: list[tuple[int, int]] = []  # (first stream column, width)
    at_marks: list[torch.Tensor] = []  # per chunk: (2 + levels, rows) counts of entries == hi, == lo, == each level
    dev = None
    offset = 0
    lo_below_hi = lo < hi
    for block in blocks():
        if dev is None or dev[0].device != block.device:
            dev = (lo.to(block.device).view(-1, 1), hi.to(block.device).view(-1, 1), levels.to(block.device))
        dev_lo, dev_hi, dev_levels = dev
        # cache-sized chunks, float 0/1 comparisons (several times faster than bool ones on a CPU) and float sums
        # (exact: a chunk holds far fewer than 2^24 entries a row); a GPU takes the whole block at once (each
        # chunk costs a synchronisation there)
        step = max(1, block.shape[1] if block.is_cuda else _CHUNK // max(rows, 1))
        width = min(step, block.shape[1])
        # buffers reused by every chunk: |x|, > hi, >= hi, > lo, >= lo, == each level; and their counts per row
        n_buf = 5 + n_levels
        buffers = torch.empty(n_buf * rows * width, dtype=torch.float32, device=block.device)
        sums = torch.empty((n_buf - 1, rows), dtype=torch.float32, device=block.device)
        for j in range(0, block.shape[1], step):
            here = min(step, block.shape[1] - j)
            parts = buffers[:n_buf * rows * here].view(n_buf, rows, here)
            mags, gt_hi, ge_hi, gt_lo, ge_lo = parts[:5]
            chunk = block[:, j:j + step]
            if repeat > 1:
                torch.abs(chunk, out=mags[:len(chunk)])
                mags[len(chunk):].copy_(mags[:len(chunk)].repeat(repeat - 1, 1))
            else:
                torch.abs(chunk, out=mags)
            torch.gt(mags, dev_hi, out=gt_hi)
            torch.ge(mags, dev_hi, out=ge_hi)
            torch.gt(mags, dev_lo, out=gt_lo)
            torch.ge(mags, dev_lo, out=ge_lo)
            for h in range(n_levels):
                torch.eq(mags, dev_levels[:, h:h + 1], out=parts[5 + h])
            for i in range(n_buf - 1):
                torch.sum(parts[1 + i], 1, out=sums[i])
            counts_here = sums.to(torch.int64).cpu()
            above += counts_here[0]
            chunks.append((offset + j, here))
            at_marks.append(torch.cat([(counts_here[1] - counts_here[0]).view(1, -1),
                                       torch.where(lo_below_hi, counts_here[3] - counts_here[2], 0).view(1, -1),
                                       counts_here[4:]]))
            # light entries strictly inside: > lo, < hi, at no level (a row with lo == hi has none)
            interior = (counts_here[2] - counts_here[1] - counts_here[4:].sum(0)).clamp_(min=0)
            per_chunk.append(interior)
            if bool((interior > 0).any()):
                window = gt_lo.sub_(ge_hi)
                for h in range(n_levels):
                    window.sub_(parts[5 + h])
                found = mags.reshape(-1)[_nonzero_sparse(window.clamp_(min=0).view(-1))].cpu()
                for r, part in enumerate(torch.split(found, interior.tolist())):  # row-major: each row's run
                    if part.numel():
                        inside[r].append(part)
                        stored[r] += part.numel()
                        if stored[r] > _FLUSH and 0 < bins[r] <= _MAX_BINS and n_levels == 0:
                            flush(r)
        offset += block.shape[1]
    marks = torch.stack(at_marks) if at_marks else torch.zeros(0, 2 + n_levels, rows, dtype=torch.int64)
    totals = marks.sum(0)  # (2 + levels, rows)
    counts_inside = torch.stack(per_chunk) if per_chunk else torch.zeros(0, rows, dtype=torch.int64)
    t, take, equal, ends = torch.empty(rows), [], [], {}
    for r, k in enumerate(counts):
        need = int(k) - int(above[r])
        if need < 0:
            break
        mark = None  # which counted mark the threshold is (0 hi, 1 lo, 2 + h level h), None for a light value
        n_above = 0
        if need <= totals[0, r]:  # the threshold is hi itself
            t[r], n_equal, mark = hi[r], int(totals[0, r]), 0
        else:
            need -= int(totals[0, r])
            if r in hist:  # the row's magnitudes became a histogram of bit patterns: the threshold from it
                if inside[r]:
                    flush(r)
                counted = hist[r]
                if need > int(counted.sum()):
                    if need - int(counted.sum()) > totals[1, r]:
                        break
                    need -= int(counted.sum())
                    t[r], n_equal, mark = lo[r], int(totals[1, r]), 1
                else:  # no known end: the mask counts the kept equal entries as they pass
                    from_top = torch.cumsum(counted.flip(0), 0)
                    i = int(torch.searchsorted(from_top, need))
                    n_above = int(from_top[i - 1]) if i > 0 else 0
                    pattern = len(counted) - 1 - i
                    t[r] = torch.tensor([first_bin[r] + pattern], dtype=torch.int64).to(torch.int32).view(
                        torch.float32)[0]
                    n_equal = int(counted[pattern])
                take.append(need - n_above)
                equal.append(n_equal)
                if mark is not None and 0 < take[-1] < n_equal:
                    seen = torch.cumsum(marks[:, mark, r], 0)
                    c = int(torch.searchsorted(seen, take[-1]))
                    before = int(seen[c - 1]) if c > 0 else 0
                    ends[r] = (chunks[c][0], chunks[c][0] + chunks[c][1], take[-1] - before)
                continue
            light = torch.cat(inside[r]) if inside[r] else torch.zeros(0)
            level_values = levels[r][~torch.isnan(levels[r])]
            n_inside = light.numel() + int(totals[2:2 + len(level_values), r].sum())
            if need <= n_inside:
                if len(level_values):  # every magnitude strictly inside, levels with their multiplicity
                    cand = torch.cat([light, level_values])
                    mult = torch.cat([torch.ones(light.numel(), dtype=torch.int64), totals[2:2 + len(level_values), r]])
                    order = torch.argsort(cand, descending=True, stable=True)
                    t[r] = cand[order[int(torch.searchsorted(torch.cumsum(mult[order], 0), need))]]
                    n_above, n_equal = int(mult[cand > t[r]].sum()), int(mult[cand == t[r]].sum())
                else:  # the need-th largest, by a selection rather than a sort
                    t[r] = torch.kthvalue(light, light.numel() - need + 1).values
                    n_above, n_equal = int((light > t[r]).sum()), int((light == t[r]).sum())
                is_level = (level_values == t[r]).nonzero().view(-1)
                if is_level.numel():
                    mark = 2 + int(is_level[0])
                elif 0 < need - n_above < n_equal:  # the chunk holding the last kept light entry equal to t
                    rank = need - n_above  # among the row's entries equal to t, in stream order
                    chunk_of = torch.repeat_interleave(torch.arange(len(per_chunk)), counts_inside[:, r])
                    chunks_of_equal = chunk_of[light == t[r]]
                    c = int(chunks_of_equal[rank - 1])
                    ends[r] = (chunks[c][0], chunks[c][0] + chunks[c][1], rank - int((chunks_of_equal < c).sum()))
            elif need - n_inside <= totals[1, r]:
                need -= n_inside
                t[r], n_equal, mark = lo[r], int(totals[1, r]), 1
            else:
                break
        take.append(need - n_above)
        equal.append(n_equal)
        if mark is not None and 0 < take[-1] < n_equal:  # the chunk in which the take-th equal entry lies
            seen = torch.cumsum(marks[:, mark, r], 0)
            c = int(torch.searchsorted(seen, take[-1]))
            before = int(seen[c - 1]) if c > 0 else 0
            ends[r] = (chunks[c][0], chunks[c][0] + chunks[c][1], take[-1] - before)
    else:
        return Thresholds(t, take, equal, ends), True
    exact = StreamingTopK(counts)
    for block in blocks():
        exact.observe_high(block.repeat(repeat, 1) if repeat > 1 else block)
    for block in blocks():
        exact.observe_low(block.repeat(repeat, 1) if repeat > 1 else block)
    return exact.thresholds(), False


def _bracket_uniform(sample: Sample, counts: Sequence[int], z: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_bracket` for every row of a sample whose entries all have the same weight (one tensor, sampled or read
    whole), vectorised: the same (lo, hi) as `_bracket` row by row, at a fraction of its cost per tensor."""
    x = sample.values
    rows, width = x.shape
    weight = float(sample.weights[0])
    total = weight * width
    k = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    # only the top ranks are needed (a margin above the largest k): a partial sort is cheaper than a full one
    depth = min(width, math.ceil(1.25 * float(k.clamp(max=total).max()) / weight) + 64)
    ordered = torch.topk(x, depth, dim=1).values if depth < width // 2 else torch.sort(x, dim=1, descending=True).values

    def value_at(rank: torch.Tensor) -> torch.Tensor:
        """Per row, the magnitude that `rank` entries (in estimated count) reach."""
        nonlocal ordered
        index = (torch.ceil(rank / weight) - 1).clamp(0, width - 1).to(torch.int64)
        if int(index.max()) >= ordered.shape[1]:  # deeper than the partial sort went
            ordered = torch.sort(x, dim=1, descending=True).values
        return ordered.gather(1, index.view(-1, 1)).view(-1).to(torch.float64)

    estimate = value_at(k)
    variance = torch.zeros(rows, dtype=torch.float64)
    if sample.strata:
        _, c, length, n = sample.strata[0]
        frac = (x[:, :c * length] > estimate.to(torch.float32).view(-1, 1)).view(rows, c, length)
        variance = n * n * (1 - c * length / n) * frac.to(torch.float64).mean(2).var(1) / c
        variance = torch.maximum(variance, weight * (torch.minimum(k, total - k) + 1))
    margin = z * variance.sqrt()
    hi = torch.where(k - margin >= 1, value_at(k - margin), math.inf)
    lo = torch.where(k + margin < total, value_at(k + margin), 0.0)
    hi = torch.maximum(hi, lo)
    none, every = k <= 0, k >= round(total)
    lo = torch.where(none, math.inf, torch.where(every, -1.0, lo))
    hi = torch.where(none, math.inf, torch.where(every, -1.0, hi))
    return lo.to(torch.float32), hi.to(torch.float32)


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
