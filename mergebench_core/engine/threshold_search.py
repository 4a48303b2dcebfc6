"""Exact top-k thresholds in one counting pass: a sample brackets each threshold, one pass over the blocks settles it.

Sorting a whole model's magnitudes, or two radix passes over it, costs more than needed: a sample of the magnitudes
(`sample_plan`, `build_sample`) brackets each row's threshold between lo and hi a few standard errors wide
(`bracket_thresholds`), and one pass over the blocks counts the entries above hi and keeps the few inside the
bracket, from which the exact threshold follows (`find_thresholds`). Should the counts show the bracket missed, the
radix select of `exact_topk.StreamingTopK` runs instead: the result is exact either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mergebench_core.engine.exact_topk import HIGH_BUCKETS, StreamingTopK, Thresholds

_CHUNK = 1 << 19  # entries (over all rows) compared at once: the temporaries stay in cache
_FLUSH = 1 << 20  # magnitudes inside a bracket kept per row before they become a histogram
_MAX_BINS = 1 << 20  # the most bit patterns such a histogram spans (8 MiB per row)


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
    """Per row: lo <= t <= hi, the magnitudes between which the sample places the row's threshold."""

    lo: torch.Tensor
    hi: torch.Tensor


def bracket_thresholds(counts: Sequence[int], sample: Sample, z: float = 6.0) -> Bracket:
    """The `Bracket` of each row: with high probability at most counts[r] entries exceed hi[r] and at least
    counts[r] reach lo[r], estimated from `sample` with a margin of `z` standard errors (`_bracket`)."""
    rows = len(counts)
    lo, hi = torch.full((rows,), -1.0), torch.full((rows,), -1.0)
    if sample.values.numel():
        if len(sample.strata) <= 1 and len(sample.values[0]) > 0 and bool((sample.weights == sample.weights[0]).all()):
            lo, hi = _bracket_uniform(sample, counts, z)  # one tensor: every row at once
        else:
            for r, k in enumerate(counts):
                lo[r], hi[r] = _bracket(sample.values[r], sample.weights, sample.strata, int(k), z)
    return Bracket(lo, hi)


def find_thresholds(counts: Sequence[int], sample: Sample | Bracket, blocks: Callable[[], Iterable[torch.Tensor]],
                    z: float = 6.0, repeat: int = 1) -> tuple[Thresholds, bool]:
    """Exact top-`counts[r]` thresholds of R rows streamed as blocks of values (R / repeat, m) by `blocks()`: row r
    ranks the magnitudes of data row r mod (R / repeat) (so two selections of different counts can share the data).

    The sample brackets each row's threshold, lo <= t <= hi, `z` standard errors wide; one pass over the blocks counts
    the entries above hi, equal to hi and equal to lo, and keeps the other magnitudes inside the bracket (a few per
    thousand), from which the exact t, and how many entries equal to it are kept, follow. Should the counts show the
    bracket missed, a two-pass radix select (`StreamingTopK`) finds the thresholds instead: exact either way.
    Returns (thresholds, whether the bracket held). `sample` may also be the `Bracket` of `bracket_thresholds`, so
    that a large sample can be freed first.
    """
    rows = len(counts)
    bracket = sample if isinstance(sample, Bracket) else bracket_thresholds(counts, sample, z)
    lo, hi = bracket.lo, bracket.hi
    above = torch.zeros(rows, dtype=torch.int64)  # entries > hi
    # The light magnitudes strictly between lo and hi are kept, chunk by chunk, row-major within a chunk, with how
    # many each row has per chunk (so each row's come in stream order); the bracket's width in ranks bounds them to a
    # few per thousand entries. Per chunk, the entries equal to hi and to lo are counted: from these counts follows
    # where the kept entries equal to the threshold end.
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
    at_marks: list[torch.Tensor] = []  # per chunk: (2, rows) counts of entries == hi, == lo
    dev = None
    offset = 0
    lo_below_hi = lo < hi
    for block in blocks():
        if dev is None or dev[0].device != block.device:
            dev = (lo.to(block.device).view(-1, 1), hi.to(block.device).view(-1, 1))
        dev_lo, dev_hi = dev
        # cache-sized chunks, float 0/1 comparisons (several times faster than bool ones on a CPU) and float sums
        # (exact: a chunk holds far fewer than 2^24 entries a row); a GPU takes the whole block at once (each
        # chunk costs a synchronisation there)
        step = max(1, block.shape[1] if block.is_cuda else _CHUNK // max(rows, 1))
        width = min(step, block.shape[1])
        # buffers reused by every chunk: |x|, > hi, >= hi, > lo, >= lo; and their counts per row
        n_buf = 5
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
            for i in range(n_buf - 1):
                torch.sum(parts[1 + i], 1, out=sums[i])
            counts_here = sums.to(torch.int64).cpu()
            above += counts_here[0]
            chunks.append((offset + j, here))
            at_marks.append(torch.stack([counts_here[1] - counts_here[0],
                                         torch.where(lo_below_hi, counts_here[3] - counts_here[2], 0)]))
            # light entries strictly inside: > lo, < hi (a row with lo == hi has none)
            interior = (counts_here[2] - counts_here[1]).clamp_(min=0)
            per_chunk.append(interior)
            if bool((interior > 0).any()):
                window = gt_lo.sub_(ge_hi)
                found = mags.reshape(-1)[_nonzero_sparse(window.clamp_(min=0).view(-1))].cpu()
                for r, part in enumerate(torch.split(found, interior.tolist())):  # row-major: each row's run
                    if part.numel():
                        inside[r].append(part)
                        stored[r] += part.numel()
                        if stored[r] > _FLUSH and 0 < bins[r] <= _MAX_BINS:
                            flush(r)
        offset += block.shape[1]
    marks = torch.stack(at_marks) if at_marks else torch.zeros(0, 2, rows, dtype=torch.int64)
    totals = marks.sum(0)  # (2, rows)
    counts_inside = torch.stack(per_chunk) if per_chunk else torch.zeros(0, rows, dtype=torch.int64)
    t, take, equal, ends = torch.empty(rows), [], [], {}
    for r, k in enumerate(counts):
        need = int(k) - int(above[r])
        if need < 0:
            break
        mark = None  # which counted mark the threshold is (0 hi, 1 lo), None for a light value
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
            n_inside = light.numel()
            if need <= n_inside:  # the need-th largest, by a selection rather than a sort
                t[r] = torch.kthvalue(light, light.numel() - need + 1).values
                n_above, n_equal = int((light > t[r]).sum()), int((light == t[r]).sum())
                if 0 < need - n_above < n_equal:  # the chunk holding the last kept light entry equal to t
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
    from_top = np.cumsum(np.bincount(top_half, weights=weights, minlength=HIGH_BUCKETS)[::-1])

    def value_at(rank: float) -> float:
        """The magnitude that `rank` entries (in estimated count) reach: the bucket of the top 16 bits first, then
        an exact weighted order inside that one bucket, which keeps the sort small."""
        i = min(int(np.searchsorted(from_top, rank)), HIGH_BUCKETS - 1)
        inside = np.flatnonzero(top_half == HIGH_BUCKETS - 1 - i)
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
