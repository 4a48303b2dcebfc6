"""The run's rule for batch-norm running statistics (`--bn-stats`, the config file's `bn_stats:`) as one value.

The rule used to be a string checked in three places (the runner, `roles.check_bn_stats`, `running_stats`), and the
runner worked out from the method's class who had already applied it. `BnStats` is parsed and checked once, where the
user's value enters, and answers the questions every place asked:

- what the streaming engine writes while it merges (`while_merging`: "base" or "mean"; a "recompute" run gets the
  mean, which the runner then replaces);
- who settles the statistics of a method's output (`applied_by`): the engine, for the "base" and "mean" rules of the
  merges it streams (a `TensorMergeMethod`); the runner for every other merge, and for "recompute", which needs the
  merged model and training data (`needs_data`).

See `mergebench_core.engine.running_stats` for what each rule computes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from mergebench_core.errors import ConfigError

BnStatsName = Literal["base", "mean", "recompute"]
BN_STATS_RULES: tuple[str, ...] = ("base", "mean", "recompute")
DEFAULT_BN_STATS: BnStatsName = "mean"
"""The experts' running statistics averaged: like every other non-matrix tensor under the data-free methods, and
right for experts fine-tuned from one base on inputs of similar scale. `recompute` is better but needs data and a
forward pass; `base` is right when the experts never updated their statistics (frozen BN)."""


@dataclass(frozen=True)
class BnStats:
    """One of `BN_STATS_RULES`; build it with `parse` (or directly: an unknown name is refused either way)."""

    name: BnStatsName = DEFAULT_BN_STATS

    def __post_init__(self) -> None:
        if self.name not in BN_STATS_RULES:
            close = difflib.get_close_matches(str(self.name), BN_STATS_RULES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"bn_stats {self.name!r}{hint}: use one of {', '.join(BN_STATS_RULES)}")

    @classmethod
    def parse(cls, value: BnStats | str | None) -> BnStats:
        """The rule `value` names (None: the default); a ConfigError naming the rules for anything else."""
        if isinstance(value, BnStats):
            return value
        return cls(DEFAULT_BN_STATS if value is None else str(value).strip())  # type: ignore[arg-type]

    @property
    def needs_data(self) -> bool:
        """Whether settling the statistics runs training data through the merged model."""
        return self.name == "recompute"

    @property
    def while_merging(self) -> Literal["base", "mean"]:
        """The rule the streaming engine writes running statistics by; "recompute" replaces them after the merge."""
        return "base" if self.name == "base" else "mean"

    def applied_by(self, streamed: bool) -> Literal["engine", "runner"]:
        """Who settles a merge's running statistics: the engine when it streamed the merge (`streamed`) and the rule
        needs no data; the runner otherwise."""
        return "engine" if streamed and not self.needs_data else "runner"

    def __str__(self) -> str:
        return self.name
