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
    """`--seed 0,1 --seed 2` as [0, 1, 2]; seed 0 when none is given.

    Seeds name cells, so a typo must not quietly change the grid: an empty item (`0,,1`), a negative seed or one
    given twice is refused rather than dropped, merged or passed on to a generator that would reject it later."""
    if not values:
        return [0]
    seeds: list[int] = []
    for item in values:
        for s in (v.strip() for v in item.split(",")):
            seeds.append(seed_value(s, given=item))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise MergebenchError(f"--seed gives seed {', '.join(map(str, repeated))} more than once; list each seed "
                              f"once, e.g. --seed 0,1,2")
    return seeds


def seed_value(text: str, given: str | None = None) -> int:
    """One seed: an integer >= 0 (what torch's and numpy's generators accept), with an error that quotes the
    option as it was typed."""
    where = f"--seed {given if given is not None else text}"
    if not text:
        raise MergebenchError(f"{where} has an empty item; seeds are integers >= 0 separated by single commas, "
                              f"e.g. --seed 0,1,2")
    try:
        seed = int(text)
    except ValueError:
        raise MergebenchError(f"--seed {text!r} is not an integer; write --seed 0 or --seed 0,1,2") from None
    if seed < 0:
        raise MergebenchError(f"{where}: seed {seed} is negative; seeds are integers >= 0")
    return seed


def trust_pickle(args: argparse.Namespace) -> bool:
    """`--trust-pickle`, or the environment variable that says the same for every command."""
    from mergebench_core.engine.pickle_checkpoints import TRUST_PICKLE_ENV

    return bool(getattr(args, "trust_pickle", False)) or \
        os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
