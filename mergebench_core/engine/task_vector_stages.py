"""The stages of the task-vector pipeline, as functions on a chunk of columns (float32 tensors on any device).

`pipeline.Pipeline` says which stages a method runs and `pipeline.TaskVectorPipelineMethod` streams them; the
functions here are the stages themselves, shared by the streamed method, by methods that combine task vectors their
own way (MagMax, EMR, preference-aware TIES) and by the whole-model reference of `mergebench_core.testing`. See the
pipeline module's docstring for what each stage computes and why.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import torch

SIGN_RULE = "sign of the sum, zero elects +"
"""The one sign-election rule of every method here (see the module docstring, step 4)."""



class StageSettings(Protocol):
    """What the stage functions read of a `pipeline.Pipeline` (a protocol, so that the stages need not import the
    pipeline that is built on them)."""

    @property
    def drop(self) -> float: ...

    @property
    def rescale(self) -> bool: ...

    @property
    def elect(self) -> bool: ...

    @property
    def elect_on(self) -> str: ...

    @property
    def combine(self) -> str: ...


def drop_salt(seed: int, key: str, task: int) -> int:
    """The 32-bit salt of DARE's draws for one (seed, tensor, task): `drop_keep` hashes it with each entry's index."""
    x = (zlib.crc32(key.encode()) ^ ((seed * 0x9E3779B1) & 0xFFFFFFFF) ^ ((task + 1) * 0x85EBCA6B)) & 0xFFFFFFFF
    return hash32(x)


def hash32(x: int) -> int:
    """The 32-bit hash of DARE's draws, on one Python int: `_hash32_` computes it on tensors, and tests check the
    two against each other."""
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
    """`hash32` on an int32 tensor, in place: products wrap modulo 2^32, shifts are made logical by masking."""
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
    salt = _signed32(drop_salt(seed, key, task))
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


def uniform_draws(seed: int, key: str, task: int, n: int, device: torch.device | str = "cpu",
                  start: int = 0) -> torch.Tensor:
    """n uniform numbers in [0, 1) (float64) for entries start..start+n-1 of task `task`'s τ of tensor `key`: the 31
    low bits of the same hash as `drop_keep` over 2^31, so `drop_keep(p)` keeps exactly the entries whose draw here is
    ≥ round(p·2^31)/2^31. For methods whose keep probability differs by entry (DELLA). A draw depends only on its
    entry's index, so a tensor's draws can be made a block at a time."""
    if start + n >= 1 << 31:
        raise ValueError(f"tensor {key!r} has {start + n} entries; uniform draws index at most 2^31 entries")
    x = torch.arange(start, start + n, dtype=torch.int32, device=device)
    x.bitwise_xor_(_signed32(drop_salt(seed, key, task)))
    _hash32_(x).bitwise_and_(0x7FFFFFFF)
    return x.to(torch.float64).div_(float(1 << 31))


_DROP_CHUNK = 1 << 18
"""Entries whose drop mask is hashed at once on a CPU: the hash's dozen passes over int32 temporaries then run in
cache (1 MiB each) instead of memory; on 4 M-entry blocks that took the hash from 6.7 to 2.7 ns per entry (one core,
`bench/merge_stages.py`). Every entry's mask depends only on its index, so the bits are the same for any chunk."""


def drop_(taus: torch.Tensor, pipe: StageSettings, seed: int, key: str, start: int) -> torch.Tensor:
    """DARE on columns [start, start + m) of the stacked τ (T, m), in place."""
    if pipe.drop <= 0.0:
        return taus
    factor = 1.0 / (1.0 - pipe.drop) if pipe.rescale else 1.0
    m = taus.shape[1]
    step = max(1, m if taus.is_cuda else _DROP_CHUNK)  # a GPU hashes the whole block in one launch per op
    for t in range(len(taus)):
        for a in range(0, m, step):
            b = min(m, a + step)
            mask = drop_keep(seed, key, t, range(start + a, start + b), pipe.drop, taus.device)
            taus[t, a:b].mul_(mask.mul_(factor))
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


def combine(trimmed: torch.Tensor, pipe: StageSettings, unweighted: torch.Tensor | None = None) -> torch.Tensor:
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
        total = signed_total(unweighted)
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


def signed_total(x: torch.Tensor) -> torch.Tensor:
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
