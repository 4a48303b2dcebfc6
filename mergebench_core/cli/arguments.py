"""Values of command-line options that several commands share: comma-separated names, seeds, the pickle switch."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from mergebench_core.contract.config import split_top_level
from mergebench_core.errors import MergebenchError


def split_names(values: Sequence[str] | None) -> list[str] | None:
    """Comma-separated names, commas inside brackets kept: `-p 'a+finetune(lr=1,steps=2)[x,y],b'` is two pools.
    None when the option was not given, so that callers can tell "not given" from "given empty"."""
    if not values:
        return None
    return [v.strip() for item in values for v in split_top_level(item) if v.strip()]


def parse_seeds(values: Sequence[str] | None) -> list[int]:
    """`--seed 0,1 --seed 2` as [0, 1, 2]; seed 0 when none is given."""
    seeds = []
    for s in split_names(values) or ["0"]:
        try:
            seeds.append(int(s))
        except ValueError:
            raise MergebenchError(f"--seed {s!r} is not an integer; write --seed 0 or --seed 0,1,2") from None
    return seeds


def trust_pickle(args: argparse.Namespace) -> bool:
    """`--trust-pickle`, or the environment variable that says the same for every command."""
    from mergebench_core.engine.tensors import TRUST_PICKLE_ENV

    return bool(getattr(args, "trust_pickle", False)) or \
        os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
