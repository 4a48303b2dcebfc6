"""Preference vectors: a cell axis for preference-aware methods, like seeds.

A preference r says how much the user cares about each task of a cell (`--preference 0.7,0.3`, `--preferences
simplex:5`, or `preferences:` in the YAML config). It is checked against the cell's tasks before any work, stored as
given and as normalised to sum 1, and is part of the cell's key, so two preferences are two results. Methods that do
not declare `MethodInfo.preference_aware` run once per pool whatever the grid names. `simplex_grid` makes the
evenly spaced vectors of `simplex:K`.

A grid grows as C(K-1+T-1, T-1) for K points per edge over T tasks (simplex:1000 over 8 tasks is about 1.9e17
vectors), so a request is counted before anything is made and refused above `max_preferences()` vectors, a cap an
environment variable raises for the rare run that means it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from mergebench_core.errors import ConfigError

MAX_PREFERENCES_ENV = "MERGEBENCH_MAX_PREFERENCES"
DEFAULT_MAX_PREFERENCES = 10_000
"""Each preference is at least one cell per method and seed: ten thousand is already a long run on the embedded
pool, and far more is a typo in K, not a plan."""
_POINTS = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True)
class Preference:
    given: tuple[float, ...]
    """As the user wrote it (stored with the result's config)."""
    normalized: tuple[float, ...]
    """Scaled to sum 1: what methods receive and what keys the cell."""

    def label(self) -> str:
        return "(" + ", ".join(f"{v:.3g}" for v in self.normalized) + ")"


@dataclass(frozen=True)
class PreferenceRequest:
    """Preferences as the command line or config names them, before the cell's tasks are known."""

    vectors: tuple[tuple[float, ...], ...] = ()
    simplex: tuple[int, ...] = ()
    """Points per edge of each requested simplex grid."""

    def __bool__(self) -> bool:
        return bool(self.vectors or self.simplex)

    def __add__(self, other: PreferenceRequest) -> PreferenceRequest:
        return PreferenceRequest(self.vectors + other.vectors, self.simplex + other.simplex)

    def count(self, num_tasks: int) -> int:
        """How many vectors the request names over `num_tasks` tasks (duplicates counted), without making any."""
        return len(self.vectors) + sum(simplex_size(num_tasks, k) for k in self.simplex)

    def expand(self, tasks: Sequence[str]) -> list[Preference]:
        """Every preference of the request over `tasks`, validated, in order, without duplicates. A request of more
        than `max_preferences()` vectors is refused before any is made."""
        check_count(self, len(tasks))
        out: dict[tuple[float, ...], Preference] = {}
        for vector in self.vectors:
            pref = validate(vector, tasks)
            out.setdefault(pref.normalized, pref)
        for points in self.simplex:
            for vector in simplex_grid(len(tasks), points):
                out.setdefault(tuple(vector), Preference(tuple(vector), tuple(vector)))
        return list(out.values())


def parse_vector(text: str, source: str = "--preference") -> tuple[float, ...]:
    """'0.7,0.3' -> (0.7, 0.3); anything that is not a list of numbers is a ConfigError naming the fix."""
    parts = [p.strip() for p in text.split(",")]
    values = []
    for part in parts:
        try:
            values.append(float(part))
        except ValueError:
            raise ConfigError(f"{source} {text!r}: {part!r} is not a number; write one weight per task, separated "
                              f"by commas, e.g. {source} 0.7,0.3") from None
    return tuple(values)


def parse_simplex(text: str) -> int:
    """'simplex:5' -> 5 points per edge (vertices included)."""
    kind, _, count = text.partition(":")
    if kind.strip() != "simplex" or not _POINTS.fullmatch(count.strip()) or int(count) < 2:
        raise ConfigError(f"--preferences {text!r}: write simplex:K with K ≥ 2 points per edge of the simplex over "
                          f"the tasks, vertices included (simplex:5 gives 5 points for two tasks, 15 for three)")
    return int(count)


def from_config(items: object) -> PreferenceRequest:
    """The YAML config's `preferences:` list: vectors ([0.7, 0.3]) and grids ("simplex:5")."""
    if not isinstance(items, list):
        raise ConfigError("config `preferences:` must be a list of vectors ([0.7, 0.3]) or grids (\"simplex:5\")")
    vectors, grids = [], []
    for item in items:
        if isinstance(item, str) and item.strip().startswith("simplex"):
            grids.append(parse_simplex(item))
        elif isinstance(item, str):
            vectors.append(parse_vector(item, "config preference"))
        elif isinstance(item, list):
            vectors.append(parse_vector(",".join(str(v) for v in item), "config preference"))
        else:
            raise ConfigError(f"config preference {item!r} is neither a vector ([0.7, 0.3]) nor a grid (simplex:5)")
    return PreferenceRequest(tuple(vectors), tuple(grids))


def max_preferences() -> int:
    """The most preference vectors one run may ask for: `MERGEBENCH_MAX_PREFERENCES`, else 10,000."""
    raw = os.environ.get(MAX_PREFERENCES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PREFERENCES
    if not _POINTS.fullmatch(raw) or int(raw) < 1:
        raise ConfigError(f"{MAX_PREFERENCES_ENV}={raw!r} is not a whole number of at least 1; set it to the most "
                          f"preference vectors a run may plan (default {DEFAULT_MAX_PREFERENCES}), or unset it")
    return int(raw)


def simplex_size(num_tasks: int, points_per_edge: int) -> int:
    """The number of vectors of `simplex_grid(num_tasks, points_per_edge)`: C(K-1+T-1, T-1), computed, not listed."""
    if num_tasks < 1 or points_per_edge < 2:
        return 0
    return math.comb(points_per_edge - 1 + num_tasks - 1, num_tasks - 1)


def largest_simplex(num_tasks: int, cap: int) -> int | None:
    """The largest K whose simplex:K grid over `num_tasks` tasks has at most `cap` vectors (None: not even K=2)."""
    if simplex_size(num_tasks, 2) > cap:
        return None
    low, high = 2, 3
    while simplex_size(num_tasks, high) <= cap:  # the size grows with K: double, then bisect
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if simplex_size(num_tasks, mid) <= cap else (low, mid)
    return low


def check_count(request: PreferenceRequest, num_tasks: int) -> None:
    """Refuse a request of more vectors than `max_preferences()`, saying how many it names, which part grows, and
    the largest grid that fits."""
    cap, total = max_preferences(), request.count(num_tasks)
    if total <= cap:
        return
    parts = [f"simplex:{k} gives {simplex_size(num_tasks, k):,} (C({k - 1 + num_tasks - 1}, {num_tasks - 1}))"
             for k in request.simplex]
    if request.vectors:
        parts.append(f"{len(request.vectors):,} vector(s) given one by one")
    fits = largest_simplex(num_tasks, max(cap - len(request.vectors), 0))
    fix = (f"the largest grid that fits is simplex:{fits} ({simplex_size(num_tasks, fits):,} vectors)" if fits
           else "no simplex grid fits beside the vectors given")
    raise ConfigError(f"the preferences over {num_tasks} task(s) name {total:,} vectors ({'; '.join(parts)}), more "
                      f"than the cap of {cap:,} (each vector is a cell per method and seed); {fix}. Ask for fewer "
                      f"points per edge, restrict the tasks with --tasks, or raise the cap with "
                      f"{MAX_PREFERENCES_ENV}=N")


def validate(vector: Iterable[float], tasks: Sequence[str]) -> Preference:
    """Check one preference against the cell's tasks; the message says the tasks in order and how to fix it."""
    values = tuple(float(v) for v in vector)
    shown = ",".join(f"{v:g}" for v in values)
    order = ", ".join(tasks)
    if len(values) != len(tasks):
        raise ConfigError(f"preference {shown} has {len(values)} weight(s), but the pool has {len(tasks)} task(s), "
                          f"in this order: {order}. Give one weight per task, or restrict the tasks with --tasks")
    if any(not math.isfinite(v) for v in values):
        raise ConfigError(f"preference {shown} has a weight that is not a finite number; tasks in order: {order}")
    if any(v < 0 for v in values):
        raise ConfigError(f"preference {shown} has a negative weight; weights are non-negative (they are "
                          f"normalised to sum 1); tasks in order: {order}")
    total = sum(values)
    if total <= 0:
        raise ConfigError(f"preference {shown} is all zeros; at least one task needs a positive weight "
                          f"(tasks in order: {order})")
    return Preference(values, tuple(v / total for v in values))


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Non-negative integer vectors of length `parts` summing to `total`, largest first entry first."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def simplex_grid(num_tasks: int, points_per_edge: int) -> list[tuple[float, ...]]:
    """Every preference vector with entries i/(K-1) summing to 1, K = `points_per_edge`, from (1, 0, ..., 0) on.

    Each entry is the correctly rounded i/(K-1), so 0.25 is exactly 0.25 and a vector's entries sum to exactly 1
    whenever K-1 is a power of two (otherwise to within rounding). There are C(K-1+m-1, m-1) vectors.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
    if points_per_edge < 2:
        raise ValueError(f"points_per_edge must be at least 2 (the two vertices of an edge), got {points_per_edge}")
    steps = points_per_edge - 1
    return [tuple(i / steps for i in c) for c in _compositions(steps, num_tasks)]
