"""One task-vector pipeline for every method that drops, trims, elects or combines task vectors.

A method built on it (TIES, DARE, Breadcrumbs, Consensus and TALL masks, EMR, preference-aware TIES) states its
stages as a `Pipeline` and, if its output is more than θ_0 + λ·merged, an `output` function; the engine then streams
it block by block (bounded memory, the same bits for any block size, on any device). The stages, in order, each
optional, for task vectors τ_t = θ_t − θ_0 (t = 1..T), computed in float32:

1. **drop** (DARE): each entry is kept with probability 1 − p and the survivors are multiplied by 1/(1 − p)
   (`rescale`). The draw for entry i of tensor `key` and task t is a hash of (seed, key, t, i) (`drop_keep`): it
   depends on nothing else, so blocks, samples, devices and the reference below all see the same mask.
2. **trim**: per task, keep the ⌊keep·n⌋ entries of largest magnitude, n counted over one tensor (`scope="tensor"`,
   as MergeKit) or over the whole model (`scope="global"`, as the TIES paper's code and FusionBench); with
   `skip_top` (Breadcrumbs) the ⌊skip_top·n⌋ largest are removed first, reduced so that ⌊keep·n⌋ remain. Counts are
   exact: among equal magnitudes the earlier entry (key order, then flat index) wins (`sparsify.topk_mask`).
3. **weight**: multiply each trimmed task vector by a per-task weight (preference-aware TIES).
4. **elect** (TIES's sign election): the elected sign of an entry is the sign of the sum of the (weighted, unless
   `elect_on="unweighted"`) trimmed vectors there, and **a sum of exactly zero elects +** (`elect_sign`). The sum
   is taken as (Σ positive entries) + (Σ negative entries), each added in task order, which the combination needs
   anyway. This is
   MergeKit's rule (`sign_weight >= 0`). The TIES paper's code instead fills such entries with the majority sign of
   the whole model, which needs a whole-model statistic and a second look at those entries; one local rule gives the
   same bits for any block, tensor order or device. The rules differ only where trimmed vectors cancel exactly.
5. **combine** the entries that agree with the elected sign (a zero entry agrees with nothing): their `sum`, their
   `mean` (over the agreeing non-zero entries), or the one of largest magnitude, `max` (EMR's unified vector).
   Without election: the plain `sum`, or for `max` the entry of largest magnitude, the later task on ties (MagMax).
6. **scale**: θ = θ_0 + scale · merged (`apply`), unless the method's `output` says otherwise.

`reference_merge` computes the same thing the plain way, over whole tensors and a whole model held in memory, for
tests to compare the streaming engine against.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from mergebench_core.errors import MergebenchError
from mergebench_core.engine.merging import Block, MergeStream, TaskVectorMethod
from mergebench_core.engine.sparsify import (
    Thresholds,
    bracket_thresholds,
    build_sample,
    find_thresholds,
    keep_count,
    sample_plan,
    topk_mask,
)

SIGN_RULE = "sign of the sum, zero elects +"
"""The one sign-election rule of every method here (see the module docstring, step 4)."""


@dataclass(frozen=True)
class Pipeline:
    """The stages of a task-vector merge (see the module docstring for each)."""

    drop: float = 0.0
    """DARE: probability of dropping each entry."""
    rescale: bool = True
    """DARE: multiply the kept entries by 1/(1 − drop)."""
    keep: float = 1.0
    """Trim: fraction of each task vector's entries kept by magnitude (1.0: no trim)."""
    skip_top: float = 0.0
    """Trim (Breadcrumbs): fraction of the largest magnitudes removed before `keep` is counted."""
    scope: str = "tensor"
    """Trim: "tensor" (counts per tensor) or "global" (over the whole model)."""
    weights: tuple[float, ...] | None = None
    """Per-task weights applied after the trim; None is 1 for every task."""
    elect: bool = False
    """TIES sign election."""
    elect_on: str = "weighted"
    """Which trimmed vectors the election sums: "weighted" or "unweighted" (the weights then act in combine only)."""
    combine: str = "sum"
    """"sum", "mean" or "max" of the (agreeing) entries."""
    scale: float = 1.0
    """λ in θ_0 + λ · merged."""
    sum_by: str = "rows"
    """A plain `sum`: "rows" adds row by row in task order (the same bits for any block); "torch" is torch's own
    reduction of each block as streamed (task arithmetic's bits before it was a preset, `engine.presets`)."""
    scale_by: str = "add"
    """"add": `torch.add(θ_0, merged, alpha=λ)`; "product": λ · merged rounded, then added (task arithmetic's and
    MagMax's bits before they were presets)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"drop must be in [0, 1), got {self.drop}")
        if not 0.0 <= self.keep <= 1.0 or not 0.0 <= self.skip_top <= 1.0:
            raise ValueError(f"keep and skip_top must be fractions in [0, 1], got {self.keep} and {self.skip_top}")
        if self.scope not in ("tensor", "global"):
            raise ValueError(f"scope must be 'tensor' or 'global', got {self.scope!r}")
        if self.combine not in ("sum", "mean", "max"):
            raise ValueError(f"combine must be 'sum', 'mean' or 'max', got {self.combine!r}")
        if self.combine == "mean" and not self.elect:
            raise ValueError("combine 'mean' averages the entries that agree with an elected sign: it needs elect")
        if self.elect_on not in ("weighted", "unweighted"):
            raise ValueError(f"elect_on must be 'weighted' or 'unweighted', got {self.elect_on!r}")
        if self.sum_by not in ("rows", "torch") or self.scale_by not in ("add", "product"):
            raise ValueError(f"sum_by must be 'rows' or 'torch' and scale_by 'add' or 'product'; got "
                             f"{self.sum_by!r} and {self.scale_by!r}")

    def apply(self, base: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
        """Stage 6: θ_0 + scale · merged in float32, by `scale_by`."""
        if self.scale_by == "product":
            return base.to(torch.float32) + self.scale * merged
        return apply(base, merged, self.scale)

    @property
    def trims(self) -> bool:
        return self.keep < 1.0 or self.skip_top > 0.0

    def counts(self, n: int, tasks: int) -> list[int]:
        """Per selection row, how many of n entries its top-k keeps: T rows, or 2T for a band (keep the top
        `skip + keep`, minus the top `skip`)."""
        kept = keep_count(self.keep, n)
        if self.skip_top <= 0.0:
            return [kept] * tasks
        skip = min(keep_count(self.skip_top, n), n - kept)
        return [skip + kept] * tasks + [skip] * tasks


# -- the stages, on a chunk of columns (float32 tensors on any device) -----------------------------------------------


def _salt(seed: int, key: str, task: int) -> int:
    """A 32-bit salt per (seed, tensor, task)."""
    x = (zlib.crc32(key.encode()) ^ ((seed * 0x9E3779B1) & 0xFFFFFFFF) ^ ((task + 1) * 0x85EBCA6B)) & 0xFFFFFFFF
    return _mix32(x)


def _mix32(x: int) -> int:
    """Python version of the 32-bit hash (`_hash32_`), also used by the tests to check the tensor one."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def _signed32(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """`_mix32` on an int32 tensor, in place: products wrap modulo 2^32, shifts are made logical by masking."""
    x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF))
    x.mul_(0x7FEB352D)
    x.bitwise_xor_(x.bitwise_right_shift(15).bitwise_and_(0x1FFFF))
    x.mul_(_signed32(0x846CA68B))
    x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF))
    return x


def drop_keep(seed: int, key: str, task: int, index: torch.Tensor | range, p: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Float 0/1: which entries of task `task`'s τ of tensor `key`, at flat `index` (a tensor or a range), DARE
    keeps. Entry i is kept when the 31 low bits of hash(salt(seed, key, task) XOR i) reach p·2^31."""
    salt = _signed32(_salt(seed, key, task))
    if isinstance(index, range) and index.stop <= 1 << 31:
        x = torch.arange(index.start, index.stop, dtype=torch.int32, device=device)
    else:
        idx = torch.as_tensor(list(index) if isinstance(index, range) else index, dtype=torch.int64, device=device)
        high = (idx >> 32).mul_(0x27D4EB2F).bitwise_and_(0xFFFFFFFF)
        low = idx.bitwise_and(0xFFFFFFFF).bitwise_xor_(high)
        x = (low - (low >= 1 << 31).to(torch.int64) * (1 << 32)).to(torch.int32)
    x.bitwise_xor_(salt)
    _hash32_(x).bitwise_and_(0x7FFFFFFF)
    return torch.ge(x, round(p * (1 << 31)), out=torch.empty(x.shape, dtype=torch.float32, device=x.device))


def drop_(taus: torch.Tensor, pipe: Pipeline, seed: int, key: str, start: int) -> torch.Tensor:
    """DARE on columns [start, start + m) of the stacked τ (T, m), in place."""
    if pipe.drop <= 0.0:
        return taus
    factor = 1.0 / (1.0 - pipe.drop) if pipe.rescale else 1.0
    for t in range(len(taus)):
        keep = drop_keep(seed, key, t, range(start, start + taus.shape[1]), pipe.drop, taus.device)
        taus[t].mul_(keep.mul_(factor))
    return taus


def sum_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over the first dimension, added row by row in order: the same bits for any layout or block of columns
    (torch's reduction may group the additions differently for different shapes)."""
    out = out if out is not None else torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
    if len(x) == 0:
        return out.zero_()
    if len(x) == 1:
        return out.copy_(x[0])
    torch.add(x[0], x[1], out=out)
    for row in x[2:]:
        out += row
    return out


def elect_sign(total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float 0/1 weights (positive side, negative side) per column: + where the sum is >= 0 (`SIGN_RULE`).
    Float-valued comparisons run several times faster on a CPU than bool masks, and x·1 + y·0 = x exactly."""
    up = torch.ge(total, 0, out=torch.empty_like(total))
    return up, torch.sub(1.0, up)


def combine(trimmed: torch.Tensor, pipe: Pipeline, unweighted: torch.Tensor | None = None) -> torch.Tensor:
    """Stages 4 and 5 on trimmed (and weighted) task vectors (T, m): the merged vector (m,).

    The entries agreeing with + are the positive ones and those agreeing with − the negative ones, so each
    combination is the positive or the negative side of the column, summed in the same order as masking would:
    no (T, m) agreement mask is built. `unweighted` is the trimmed vectors before weighting, for
    `elect_on="unweighted"`.
    """
    if not pipe.elect:
        if pipe.combine == "max":
            return max_magnitude(trimmed)
        return trimmed.sum(0) if pipe.sum_by == "torch" else sum_rows(trimmed)
    part = torch.relu(trimmed)
    positive = sum_rows(part)
    torch.sub(trimmed, part, out=part)  # min(t, 0), exactly
    negative = sum_rows(part)
    if unweighted is not None and pipe.elect_on == "unweighted" and unweighted is not trimmed:
        total = _signed_total(unweighted)
    else:
        total = positive + negative
    up, down = elect_sign(total)
    if pipe.combine == "max":
        torch.clamp(trimmed, min=0, out=part)
        top = torch.amax(part, 0) if len(trimmed) else torch.zeros_like(total)
        torch.sub(trimmed, part, out=part)
        bottom = torch.amin(part, 0) if len(trimmed) else torch.zeros_like(total)
        return top.mul_(up).addcmul_(bottom, down)
    merged = positive.mul_(up).addcmul_(negative, down)
    if pipe.combine == "mean":
        count_up = sum_rows(torch.gt(trimmed, 0, out=part))
        count_down = sum_rows(torch.lt(trimmed, 0, out=part))
        merged /= count_up.mul_(up).addcmul_(count_down, down).clamp_(min=1)
    return merged


def _signed_total(x: torch.Tensor) -> torch.Tensor:
    """Σ positive entries + Σ negative entries, each summed row by row: the sum the sign election reads."""
    part = torch.relu(x)
    positive = sum_rows(part)
    torch.sub(x, part, out=part)
    return positive.add_(sum_rows(part))


def max_magnitude(taus: torch.Tensor) -> torch.Tensor:
    """Per column, the value of largest |τ| among the rows (T, m); the later row wins ties (MagMax's release)."""
    chosen = taus[0].clone()
    for tau in taus[1:]:
        chosen = torch.where(tau.abs() >= chosen.abs(), tau, chosen)
    return chosen


def apply(base: torch.Tensor, merged: torch.Tensor, scale: float) -> torch.Tensor:
    """θ_0 + scale · merged, one formula for every path (streamed, reference, patched)."""
    return torch.add(base.to(torch.float32), merged, alpha=scale)


# -- the streaming method ---------------------------------------------------------------------------------------


class TaskVectorPipelineMethod(TaskVectorMethod):
    """A method defined by a `Pipeline` (from its parameters) and an `output`; the engine streams it in blocks.

    Implement `pipeline()`; override `output` when the result is more than θ_0 + scale · merged (per-task outputs,
    masks that depend on the merged vector). `output` must be column-local: its value at an entry may depend only
    on the inputs at that entry (that is what lets the engine cut tensors into blocks).
    """

    blockwise: ClassVar[bool] = True
    chunk_entries: ClassVar[int] = 1 << 19
    """Entries (over all task vectors) that the kernel works on at once: 2 MB keeps every temporary in cache."""
    sample_rate: ClassVar[float] = 1 / 64
    """Share of the entries sampled to bracket each trim threshold before the one counting pass."""
    sample_cap: ClassVar[int] = 1 << 22
    """The most entries sampled per task vector (a large model is sampled at a lower rate: the sample is held whole
    while the brackets are computed, and 4 M entries a task bracket a threshold to a few per thousand)."""

    def pipeline(self) -> Pipeline:
        raise NotImplementedError(f"{type(self).__name__} does not define its pipeline")

    def output(self, key: str, base: torch.Tensor, taus: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
        """The merged values at some columns: base (m,), untrimmed (dropped) task vectors (T, m), the pipeline's
        merged vector (m,). Returns (m,), or (T, m) for a task-specific method."""
        return self._pipe.apply(base, merged)

    # -- engine hooks --

    def prepare(self, stream: MergeStream) -> None:
        self._pipe = self.pipeline()
        if self._pipe.weights is not None and len(self._pipe.weights) != stream.num_experts:
            raise MergebenchError(f"{self.name} has {len(self._pipe.weights)} weights for {stream.num_experts} "
                                  f"experts")
        self._weights: dict[torch.device, torch.Tensor] = {}
        self._global: Thresholds | None = None
        self._tensor: Thresholds | None = None
        self._offsets: dict[str, int] = {}  # stream column of each tensor's first entry, for the global selection
        if self._pipe.trims and self._pipe.scope == "global":
            self._global = self.find_thresholds(stream, stream.keys)
            self.extras["kept_per_task"] = keep_count(self._pipe.keep, stream.numel())
            column = 0
            for key in stream.keys:
                self._offsets[key] = column
                column += torch.Size(stream.shape(key)).numel()

    def begin_tensor(self, key: str, stream: MergeStream, blocks: Sequence[Block]) -> None:
        self._tensor = None
        if self._pipe.trims and self._pipe.scope == "tensor" and len(blocks) > 1:
            self._tensor = self.find_thresholds(stream, [key])  # one counting pass over this tensor's blocks

    def merge_block(self, block: Block, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        pipe = self._pipe
        drop_(taus, pipe, self.seed, block.key, block.start)
        selection, column = self._global, self._offsets.get(block.key, 0) + block.start
        if selection is None:
            selection = self._tensor
            if pipe.trims and selection is None:  # a whole tensor in memory: its thresholds from itself
                selection = self._thresholds_in_memory(block.key, taus)
        return self._kernel(block.key, base, taus, selection, column)

    # -- the pieces --

    def _kernel(self, key: str, base: torch.Tensor, taus: torch.Tensor, selection: Thresholds | None,
                column: int = 0) -> torch.Tensor:
        """Merge a block (base (m,), τ (T, m)) whose first entry is stream column `column` of `selection`."""
        out = None
        m = taus.shape[1]
        for j, tc, merged in self._merged_chunks(taus, selection, column):
            piece = self.output(key, base[j:j + tc.shape[1]], tc, merged)
            if out is None:
                out = torch.empty((*piece.shape[:-1], m), dtype=piece.dtype, device=piece.device)
            out[..., j:j + tc.shape[1]] = piece
        if out is None:  # an empty tensor
            out = self.output(key, base, taus, torch.zeros_like(base, dtype=torch.float32))
        return out

    def _merged_chunks(self, taus: torch.Tensor, selection: Thresholds | None, column: int = 0
                       ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first column, the (dropped) τ of the chunk, its merged vector) for cache-sized chunks of a block."""
        pipe, tasks = self._pipe, len(taus)
        weights = self._weight_tensor(taus.device)
        # cache-sized chunks on a CPU; a GPU takes the whole block at once, and so does torch's sum (`sum_by`),
        # which reduces a slice of a block differently from the block
        whole = taus.is_cuda or (pipe.sum_by == "torch" and not pipe.elect)
        step = max(1, taus.shape[1] if whole else self.chunk_entries // max(tasks, 1))
        for j in range(0, taus.shape[1], step):
            tc = taus[:, j:j + step]
            trimmed = unweighted = tc
            if selection is not None:
                keep = selection.mask(self._rows(tc.abs()), start=column + j)
                if len(keep) > tasks:  # a band: the top (skip + keep) minus the top skip
                    keep = keep[:tasks].sub_(keep[tasks:])
                trimmed = unweighted = keep.mul_(tc)
            if weights is not None:
                trimmed = torch.mul(unweighted, weights)
            yield j, tc, combine(trimmed, pipe, unweighted)

    def _weight_tensor(self, device: torch.device) -> torch.Tensor | None:
        if self._pipe.weights is None:
            return None
        if device not in self._weights:
            self._weights[device] = torch.tensor(self._pipe.weights, dtype=torch.float32, device=device).view(-1, 1)
        return self._weights[device]

    def _repeat(self) -> int:
        return 2 if self._pipe.skip_top > 0.0 else 1

    def _rows(self, mags: torch.Tensor) -> torch.Tensor:
        """The selection rows of a block of magnitudes: the T rows, twice for a band."""
        return torch.cat([mags, mags]) if self._pipe.skip_top > 0.0 else mags

    def find_thresholds(self, stream: MergeStream, keys: Sequence[str]) -> Thresholds:
        """Exact trim thresholds over `keys` (one tensor, or the whole model): a sample of the (dropped) task vectors
        brackets them, then one counting pass over the blocks settles them (`sparsify.find_thresholds`)."""
        pipe, tasks = self._pipe, stream.num_experts
        n = sum(torch.Size(stream.shape(k)).numel() for k in keys)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32("\0".join(keys[:1]).encode()))
                                                  % (2**63))
        parts = []
        rate = min(self.sample_rate, self.sample_cap / max(n, 1))
        for key in keys:
            size = torch.Size(stream.shape(key)).numel()
            if size == 0:
                continue
            starts, length = sample_plan(size, generator, rate)
            values = stream.task_vector_slices(key, starts, length)  # (T, c, L), on the host
            if pipe.drop > 0.0:
                index = (torch.tensor(starts, dtype=torch.int64).view(-1, 1) + torch.arange(length)).view(-1)
                factor = 1.0 / (1.0 - pipe.drop) if pipe.rescale else 1.0
                for t in range(tasks):
                    keep = drop_keep(self.seed, key, t, index, pipe.drop).mul_(factor)
                    values[t].view(-1).mul_(keep)
            parts.append((self._rows(values.reshape(tasks, -1).abs_()), len(starts), size))
        counts = pipe.counts(n, tasks)
        bracket = bracket_thresholds(counts, build_sample(parts))  # the sample is freed before the counting pass
        del parts

        def blocks() -> Iterator[torch.Tensor]:
            for key in keys:
                for block, _, taus in stream.task_vector_blocks(key, reuse=True):
                    yield drop_(taus, pipe, self.seed, key, block.start)
                    del taus

        selection, held = find_thresholds(counts, bracket, blocks, repeat=self._repeat())
        if not held:
            self.extras["exact_fallbacks"] = self.extras.get("exact_fallbacks", 0) + 1
        return selection

    def _thresholds_in_memory(self, key: str, taus: torch.Tensor) -> Thresholds:
        """Exact per-tensor thresholds of a (dropped) tensor held whole: sampled and counted in memory."""
        tasks, n = taus.shape
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
        starts, length = sample_plan(n, generator, self.sample_rate)
        index = (torch.tensor(starts, dtype=torch.int64).view(-1, 1) + torch.arange(length)).view(-1)
        sampled = taus[:, index.to(taus.device)].abs()
        sample = build_sample([(self._rows(sampled), len(starts), n)])
        selection, held = find_thresholds(self._pipe.counts(n, tasks), sample, lambda: [taus], repeat=self._repeat())
        if not held:
            self.extras["exact_fallbacks"] = self.extras.get("exact_fallbacks", 0) + 1
        return selection

    def merged_blocks(self, stream: MergeStream) -> Iterator[tuple[Block, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(block, base, dropped τ, merged) over the whole stream: for methods that need a whole-model statistic
        of the merged vector before writing anything (EMR's rescalers). Only for pipelines without a trim."""
        if self._pipe.trims:
            raise MergebenchError("merged_blocks is for pipelines without a trim")
        for key in stream.keys:
            for block, base, taus in stream.task_vector_blocks(key, reuse=True):
                drop_(taus, self._pipe, self.seed, key, block.start)
                pieces = [merged for _, _, merged in self._merged_chunks(taus, None)]
                yield block, base, taus, torch.cat(pieces) if pieces else torch.zeros_like(base)


# -- the reference: whole tensors, the whole model in memory, the plain way -------------------------------------------


@dataclass
class ReferenceTensor:
    """What the reference pipeline computes for one tensor."""

    taus: torch.Tensor
    """(T, *shape): the task vectors after the drop, untrimmed."""
    trimmed: torch.Tensor
    """(T, *shape): after the trim and the weights."""
    sign: torch.Tensor | None
    """(*shape): the elected sign (±1), None without election."""
    merged: torch.Tensor
    """(*shape): the combined vector."""


def reference_merge(pipe: Pipeline, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                    *, seed: int = 0) -> dict[str, ReferenceTensor]:
    """The pipeline written directly over the whole model held in memory: every floating-point tensor of `base`.

    Independent of the streaming code except for `drop_keep` (the random draws must be the same ones), `topk_mask`
    (exact top-k by a stable sort) and the order of additions, so the two agree bit for bit.
    """
    keys = [k for k, v in base.items() if v.is_floating_point()]
    tasks = len(experts)
    taus = {}
    for key in keys:
        b = base[key].to(torch.float32)
        tau = torch.stack([e[key].to(torch.float32) - b for e in experts]).reshape(tasks, -1)
        if pipe.drop > 0.0:
            factor = 1.0 / (1.0 - pipe.drop) if pipe.rescale else 1.0
            for t in range(tasks):
                tau[t] = tau[t] * (drop_keep(seed, key, t, range(tau.shape[1]), pipe.drop) * factor)
        taus[key] = tau
    keep = {key: torch.ones_like(taus[key]) for key in keys}
    if pipe.trims:
        groups = [keys] if pipe.scope == "global" else [[key] for key in keys]
        for group in groups:
            flat = torch.cat([taus[key] for key in group], 1)
            n = flat.shape[1]
            counts = pipe.counts(n, tasks)
            mask = torch.stack([topk_mask(flat[t], counts[t]) for t in range(tasks)])
            if pipe.skip_top > 0.0:
                mask &= ~torch.stack([topk_mask(flat[t], counts[tasks + t]) for t in range(tasks)])
            offset = 0
            for key in group:
                width = taus[key].shape[1]
                keep[key] = mask[:, offset:offset + width].to(torch.float32)
                offset += width
    weights = torch.tensor(pipe.weights if pipe.weights is not None else [1.0] * tasks).view(-1, 1)
    out = {}
    for key in keys:
        shape = base[key].shape
        unweighted = taus[key] * keep[key]
        trimmed = unweighted * weights if pipe.weights is not None else unweighted
        sign = None
        if not pipe.elect:
            merged = max_magnitude(trimmed) if pipe.combine == "max" else _sum_in_order(trimmed)
        else:
            voters = unweighted if pipe.elect_on == "unweighted" else trimmed
            total = _sum_in_order(torch.where(voters > 0, voters, 0.0)) + _sum_in_order(torch.where(voters < 0, voters,
                                                                                                     0.0))
            sign = torch.where(total >= 0, 1.0, -1.0)
            agree = (trimmed * sign) > 0
            if pipe.combine == "max":
                merged = sign * (trimmed.abs() * agree).amax(0)
            else:
                merged = _sum_in_order(torch.where(agree, trimmed, torch.zeros_like(trimmed)))
                if pipe.combine == "mean":
                    merged = merged / _sum_in_order(agree.to(torch.float32)).clamp(min=1)
        out[key] = ReferenceTensor(taus[key].view(tasks, *shape), trimmed.view(tasks, *shape),
                                   None if sign is None else sign.view(shape), merged.view(shape))
    return out


def _sum_in_order(x: torch.Tensor) -> torch.Tensor:
    total = torch.zeros_like(x[0]) if len(x) else torch.zeros(x.shape[1:])
    for i, row in enumerate(x):
        total = row.clone() if i == 0 else total + row
    return total


def reference_outputs(pipe: Pipeline, base: Mapping[str, torch.Tensor],
                      experts: Sequence[Mapping[str, torch.Tensor]], *, seed: int = 0,
                      output: Callable[[str, torch.Tensor, ReferenceTensor], torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """θ_0 + scale · merged per tensor (or `output(key, base, reference)`), in the base's dtype: what a pipeline
    method with the default `output` writes."""
    result = {}
    for key, ref in reference_merge(pipe, base, experts, seed=seed).items():
        value = output(key, base[key], ref) if output is not None else apply(base[key], ref.merged, pipe.scale)
        result[key] = value.to(base[key].dtype)
    return result


def agreeing_task_vectors(taus: torch.Tensor, keep: float) -> torch.Tensor:
    """Per-task TIES processing of whole-model task vectors (T, P), kept separate: each keeps its top ⌊keep·P⌋
    entries, then only those that agree with the elected sign (`SIGN_RULE`). AdaMerging++ learns their weights."""
    pipe = Pipeline(keep=keep, scope="global", elect=True)
    counts = pipe.counts(taus.shape[1], len(taus))
    trimmed = taus * torch.stack([topk_mask(row, c) for row, c in zip(taus, counts)])
    sign = torch.where(_signed_total(trimmed) >= 0, 1.0, -1.0)
    return torch.where(trimmed * sign > 0, trimmed, torch.zeros_like(trimmed))
