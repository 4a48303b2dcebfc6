"""Cells, the unit of a grid (one method with one parameter setting on one pool, at one seed and preference), and what
the planning of a grid checks and reports about them: the config file's sections, the rows not run and why.

A cell also travels as a picklable description (`Cell.spec`), which another machine's runner turns back into a cell
with its own plugins (`cell_from_spec`), so executors on other machines never need the runner's objects.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebench_core.contract.api import Method, Registration
from mergebench_core.contract.config import field_types, instantiate_params, params_dict
from mergebench_core.contract.registry import Registry
from mergebench_core.errors import ConfigError
from mergebench_core.pools.params import POOL_SECTION
from mergebench_core.preferences.vectors import Preference, validate
from mergebench_core.results.store import CellResult


@dataclass
class Cell:
    method: str
    method_cls: type[Method]
    registration: Registration
    params: Any
    modelpool: str
    taskpool: str
    seed: int
    preference: Preference | None = None
    order: int | None = None
    """The task order seed of a continual method's cell (`running.task_order`); None for other methods."""

    @property
    def label(self) -> str:
        pref = f" at preference {self.preference.label()}" if self.preference is not None else ""
        order = f" in task order {self.order}" if self.order else ""
        return f"{self.method} on {self.modelpool}{pref}{order}"

    def spec(self) -> tuple[Any, ...]:
        """The cell as plain, picklable values: its names, parameters, seed, the preference as the user gave it and
        the task order."""
        pref = self.preference.given if self.preference is not None else None
        return ("method", self.method, params_dict(self.params), self.modelpool, self.taskpool, self.seed, pref,
                self.order)


def cell_from_spec(registry: Registry, spec: Sequence[Any], tasks: Sequence[str]) -> Cell:
    """The cell `Cell.spec` describes, with this process's plugins; `tasks` are those of its task pool (the
    preference is checked against them again)."""
    _, method, params, modelpool, taskpool, seed, given, *order = spec
    reg = registry.method_registration(method)
    values = instantiate_params(method, reg.obj.Params, params, [], field_types(reg.obj.Params))
    preference = validate(given, tasks) if given is not None else None
    return Cell(reg.name, reg.obj, reg, values, modelpool, taskpool, seed, preference, order[0] if order else None)


@dataclass
class RunReport:
    results: list[CellResult] = field(default_factory=list)
    skipped: int = 0
    not_applicable: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    interrupted: int = 0
    """Rows left uncomputed because the user pressed Ctrl-C."""
    unwritten: list[str] = field(default_factory=list)
    """Why each computed row the store refused was not written, and where it was kept instead."""

    @property
    def failed(self) -> list[CellResult]:
        return [r for r in self.results if r.status != "ok"]


TOP_LEVEL_SECTIONS = ("method", "preferences", POOL_SECTION, "bn_stats")


def check_sections(config: dict[str, Any], path: str | Path | None, methods: Iterable[str]) -> None:
    """Every top-level key of the config file is `method`, `preferences`, `modelpool`, `bn_stats` or an installed
    method: a typo (`mehtod:`, `tiez:`, `modelpol:`) would otherwise be ignored and the run would use defaults."""
    known = [*TOP_LEVEL_SECTIONS, *methods]
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"config file {str(path)!r}: unknown section {key!r}.{hint} Sections are `method:` "
                              f"(every selected method), `preferences:`, `modelpool:` (pool parameters), `bn_stats:`, "
                              f"or a method's name (see `mergebench list`)")


def group_reasons(lines: Sequence[str]) -> list[str]:
    """'a on p: why' and 'b on p: why' -> 'a, b on p: why', in first-seen order, each line once."""
    grouped: dict[str, list[str]] = {}
    for line in lines:
        method, _, rest = line.partition(" on ")
        names = grouped.setdefault(rest, [])
        if method not in names:
            names.append(method)
    return [f"{', '.join(names)} on {rest}" for rest, names in grouped.items()]
