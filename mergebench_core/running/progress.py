"""Progress of a grid as log lines, readable in a log file."""

from __future__ import annotations

import logging
import time

from mergebench_core.results.store import CellResult

log = logging.getLogger("mergebench_core.running.runner")  # the logger these lines always came from


class GridProgress:
    """One log line per finished row: count, outcome, elapsed time and an estimate of the time left (the mean time
    per row so far, times the rows left)."""

    def __init__(self, total: int):
        self.total, self.count, self.start = total, 0, time.monotonic()

    def done(self, label: str, result: CellResult) -> None:
        self.count += 1
        elapsed = time.monotonic() - self.start
        left = elapsed / self.count * (self.total - self.count)
        outcome = "ok" if result.status == "ok" else f"FAILED ({result.error})"
        score = f", avg {100 * result.mean:.1f}" if result.mean is not None else ""
        log.info("[%d/%d] %s: %s%s; elapsed %s, about %s left", self.count, self.total, label, outcome, score,
                 duration(elapsed), duration(left))


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
