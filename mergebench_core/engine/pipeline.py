"""One task-vector pipeline for every method that drops, trims, elects or combines task vectors.

A method built on it (TIES, DARE, Breadcrumbs, Consensus and TALL masks, EMR, preference-aware TIES) states its
stages as a `Pipeline` and, if its output is more than θ_0 + λ·merged, an `output` function; the engine then streams
it block by block (bounded memory, the same bits for any block size, on any device). The stages, in order, each
optional, for task vectors τ_t = θ_t − θ_0 (t = 1..T), computed in float32:

1. **drop** (DARE): each entry is kept with probability 1 − p and the survivors are multiplied by 1/(1 − p)
   (`rescale`). The draw for entry i of tensor `key` and task t is a hash of (seed, key, t, i) (`drop_keep`): it
   depends on nothing else, so blocks, samples, devices and the whole-model reference all see the same mask.
2. **trim**: per task, keep the ⌊keep·n⌋ entries of largest magnitude, n counted over one tensor (`scope="tensor"`,
   as MergeKit) or over the whole model (`scope="global"`, as the TIES paper's code and FusionBench); with
   `skip_top` (Breadcrumbs) the ⌊skip_top·n⌋ largest are removed first, reduced so that ⌊keep·n⌋ remain. Counts are
   exact: among equal magnitudes the earlier entry (key order, then flat index) wins (`exact_topk.topk_mask`).
3. **weight**: multiply each trimmed task vector by a per-task weight (preference-aware TIES).
4. **elect** (TIES's sign election): the elected sign of an entry is the sign of the sum of the (weighted, unless
   `elect_on="unweighted"`) trimmed vectors there, and **a sum of exactly zero elects +** (`elect_sign`). The sum
   is taken as (Σ positive entries) + (Σ negative entries), each added in task order, which the combination needs
   anyway. This is MergeKit's rule (`sign_weight >= 0`). The TIES paper's code instead fills such entries with the
   majority sign of the whole model, which needs a whole-model statistic and a second look at those entries; one
   local rule gives the same bits for any block, tensor order or device. The rules differ only where trimmed vectors
   cancel exactly.
5. **combine** the entries that agree with the elected sign (a zero entry agrees with nothing): their `sum`, their
   `mean` (over the agreeing non-zero entries), or the one of largest magnitude, `max` (EMR's unified vector).
   Without election: the plain `sum`, or for `max` the entry of largest magnitude, the later task on ties (MagMax).
6. **scale**: θ = θ_0 + scale · merged (`apply`), unless the method's `output` says otherwise.

The stage functions live in `task_vector_stages` (re-exported here); `mergebench_core.testing.reference_merge`
computes the same thing the plain way, over whole tensors and a whole model held in memory, for tests to compare the
streaming engine against.

**Words.** Internal code and docstrings use one word per idea: `keep` is the fraction of a task vector's entries
that the trim keeps (`Pipeline.keep`, `exact_topk.keep_count`), a *count* is a number of entries (⌊keep·n⌋), and
a *mask* is a 0/1 array of the entries kept. Users set these under the names each method's paper gives them; those
names are part of every stored result's key and do not change:

- `keep` <- `ties.k`, `pa_ties.k`, `dare_ties.k`, `adamerging_pp.k`, `consensus.ties_k`, `tall_masks.ties_k`,
  `breadcrumbs.density`;
- `skip_top` <- `breadcrumbs.gamma`;
- `drop` <- `dare_ta.p`, `dare_ties.p`;
- `scale` <- `scaling_factor` of every method.

(`consensus.k`, how many task masks must agree, is a count, not a fraction.)
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mergebench_core.engine.data_free import TaskVectorMethod
from mergebench_core.engine.exact_topk import Thresholds, keep_count, topk_mask
from mergebench_core.engine.stream import Block, MergeStream
from mergebench_core.engine.task_vector_stages import (
    SIGN_RULE,
    apply,
    combine,
    drop_,
    drop_keep,
    elect_sign,
    max_magnitude,
    signed_total,
    sum_rows,
)
from mergebench_core.engine.threshold_search import bracket_thresholds, build_sample, find_thresholds, sample_plan
from mergebench_core.errors import MergebenchError

__all__ = [
    "SIGN_RULE", "Pipeline", "TaskVectorPipelineMethod", "agreeing_task_vectors", "apply", "combine", "drop_",
    "drop_keep", "elect_sign", "max_magnitude", "sum_rows",
]

_MOVED_TO_TESTING = ("ReferenceTensor", "reference_merge", "reference_outputs")


def __getattr__(name: str) -> Any:
    """The whole-model reference moved to `mergebench_core.testing` (it is test code); tests written against the
    previous README still find it here, with a warning that says where it went."""
    if name in _MOVED_TO_TESTING:
        import mergebench_core.testing as testing

        warnings.warn(f"mergebench_core.engine.pipeline.{name} moved to mergebench_core.testing.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(testing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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



def agreeing_task_vectors(taus: torch.Tensor, keep: float) -> torch.Tensor:
    """Per-task TIES processing of whole-model task vectors (T, P), kept separate: each keeps its top ⌊keep·P⌋
    entries, then only those that agree with the elected sign (`SIGN_RULE`). AdaMerging++ learns their weights."""
    pipe = Pipeline(keep=keep, scope="global", elect=True)
    counts = pipe.counts(taus.shape[1], len(taus))
    trimmed = taus * torch.stack([topk_mask(row, c) for row, c in zip(taus, counts)])
    sign = torch.where(signed_total(trimmed) >= 0, 1.0, -1.0)
    return torch.where(trimmed * sign > 0, trimmed, torch.zeros_like(trimmed))
