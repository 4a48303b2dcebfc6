"""Progress bars on the terminal, for the command line only: libraries take a `progress` callable and stay silent
without one, so that a test, a notebook or a worker process never draws bars it cannot show."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterator[T]:
    """`iterable`, with a bar on stderr when stderr is a terminal (tqdm's `disable=None`); the bar is removed when
    done, so that the tables printed afterwards stay readable. Plugin commands pass it to the runner too."""
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, leave=False, disable=None, file=sys.stderr))
