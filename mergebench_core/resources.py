"""Measuring what a cell costs: wall time and peak memory."""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the lifetime high-water mark is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None

    @property
    def peak_mb(self) -> float:
        """GPU peak on CUDA runs, process RSS peak otherwise."""
        return self.peak_cuda_mb if self.peak_cuda_mb is not None else self.peak_rss_mb


class measure:
    """Context manager: wall time and peak RSS (sampled every few ms) of the code inside, plus CUDA peak."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.result = Measurement()
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> Measurement:
        self._peak = current_rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self.result

    def __exit__(self, *_: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result.peak_cuda_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.result.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, current_rss_bytes())
        self.result.peak_rss_mb = self._peak / 2**20
