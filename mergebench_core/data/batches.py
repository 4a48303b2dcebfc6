"""Seeded, memory-bounded data order over a task pool's split.

Task pools hand out batches in a fixed order, and a class-sorted split read in order gives one-class batches, which
bias any gradient step; every method that learns from data therefore needs a shuffled order, reproducible from the
run's seed. Some splits (the CLIP datasets) are far too large to hold, so the order is built in bounded memory:

- a split of at most `buffer` examples is held whole and permuted every epoch, exactly as a shuffling data loader;
- a larger one streams through a buffer of `buffer` examples: each batch is drawn from random slots of the buffer,
  and those slots are refilled from the split read in order; when the split runs out, the buffer is emptied in a
  random order, which closes the epoch. Every example is thus yielded exactly once per epoch in both cases.

Only the `generator` given is drawn from (never the global RNG), so two calls with equally seeded generators yield
the same batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from mergebench_core.contract.api import Batch, TaskPool
from mergebench_core.errors import MergebenchError

READ_SIZE = 256
"""Examples per batch requested from the task pool while reading; the order yielded does not depend on it."""


def _rows(taskpool: TaskPool, task: str, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over the split, one (input, label) example at a time, in the task pool's order."""
    for inputs, labels in taskpool.batches(task, split, batch_size=READ_SIZE):
        yield from zip(inputs, labels)


def shuffled_batches(taskpool: TaskPool, task: str, split: str = "train", *, batch_size: int,
                     generator: torch.Generator, buffer: int = 1024, epochs: int | None = None) -> Iterator[Batch]:
    """Batches (inputs, labels) of `task`'s `split` in a shuffled order, for `epochs` epochs (None: without end).

    The last batch of an epoch may be smaller than `batch_size`; batches never mix two epochs, so each epoch holds
    every example exactly once. Tensors stay on the CPU, where the task pool put them.
    """
    if batch_size < 1 or buffer < batch_size:
        raise ValueError(f"need 1 <= batch_size <= buffer, got batch_size={batch_size}, buffer={buffer}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be None (without end) or >= 1, got {epochs}")
    rows = _rows(taskpool, task, split)
    held = list(itertools.islice(rows, buffer))
    if not held:
        raise MergebenchError(f"task {task!r} of task pool {taskpool.name!r} has no {split} examples to train on")
    xs, ys = torch.stack([x for x, _ in held]), torch.stack([y for _, y in held])
    del held
    extra = next(rows, None)
    passes = itertools.count() if epochs is None else range(epochs)
    if extra is None:  # the whole split is held: a fresh permutation every epoch
        for _ in passes:
            order = torch.randperm(len(xs), generator=generator)
            for i in range(0, len(order), batch_size):
                yield xs[order[i:i + batch_size]], ys[order[i:i + batch_size]]
        return
    stream: Iterator[tuple[torch.Tensor, torch.Tensor]] = itertools.chain([extra], rows)
    for epoch in passes:
        if epoch > 0:  # refill the emptied buffer from the start of a new pass
            stream = _rows(taskpool, task, split)
            for slot, (x, y) in enumerate(itertools.islice(stream, buffer)):
                xs[slot], ys[slot] = x, y
        yield from _stream_epoch(xs, ys, stream, batch_size, generator)


def _stream_epoch(xs: torch.Tensor, ys: torch.Tensor, stream: Iterator[tuple[torch.Tensor, torch.Tensor]],
                  batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """One epoch through a full buffer (xs, ys): draw a batch from random slots, refill those slots from `stream`;
    once `stream` is exhausted, yield what the buffer still holds in a random order."""
    empty: list[int] = []
    while not empty:
        slots = torch.randperm(len(xs), generator=generator)[:batch_size]
        yield xs[slots], ys[slots]  # advanced indexing copies, so refilling below does not touch the batch
        for j, slot in enumerate(slots.tolist()):
            row = next(stream, None)
            if row is None:
                empty = slots[j:].tolist()
                break
            xs[slot], ys[slot] = row
    live = torch.ones(len(xs), dtype=torch.bool)
    live[empty] = False
    remaining = live.nonzero().squeeze(1)
    order = remaining[torch.randperm(len(remaining), generator=generator)]
    for i in range(0, len(order), batch_size):
        yield xs[order[i:i + batch_size]], ys[order[i:i + batch_size]]
