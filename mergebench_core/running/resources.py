"""Measuring what a cell costs: wall time and peak memory.

Peak memory is the cell's own: the most memory the code inside `measure` allocated beyond what the process already
held when it started. On glibc it is read from the allocator's statistics (`mallinfo2`: bytes in use, freed blocks
excluded), so neither what earlier cells left allocated nor the freed memory the allocator keeps for reuse changes a
cell's number; elsewhere the process RSS (its high-water mark) stands in. On CUDA it is torch's peak of allocated
GPU memory.
"""

from __future__ import annotations

import ctypes
import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the lifetime high-water mark is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc older than 2.33
        return None
    fn.restype = _MallInfo2
    return fn  # type: ignore[no-any-return]


_MALLINFO2 = _mallinfo2()


def heap_in_use_bytes() -> int | None:
    """Bytes the C allocator has handed out and not taken back (small blocks plus mmapped ones); None when unknown.
    Costs about a microsecond."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    """The process RSS high-water mark while measuring (includes everything the process held before)."""
    peak_heap_mb: float | None = None
    """The most heap memory allocated beyond what was in use at the start (None without glibc's statistics)."""
    peak_cuda_mb: float | None = None

    @property
    def peak_mb(self) -> float:
        """The measured code's own peak: GPU memory on CUDA, else heap beyond the start, else process RSS."""
        if self.peak_cuda_mb is not None:
            return self.peak_cuda_mb
        return self.peak_heap_mb if self.peak_heap_mb is not None else self.peak_rss_mb


class measure:
    """Context manager: wall time and peak RSS (sampled every few ms) of the code inside, plus CUDA peak."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.result = Measurement()
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sample_once()
            self._stop.wait(self.interval)

    def _sample_once(self) -> None:
        self._peak = max(self._peak, current_rss_bytes())
        heap = heap_in_use_bytes()
        if heap is not None:
            self._heap_peak = max(self._heap_peak, heap)

    def __enter__(self) -> Measurement:
        self._peak = current_rss_bytes()
        self._heap_start = heap_in_use_bytes()
        self._heap_peak = self._heap_start or 0
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
        self._sample_once()
        self.result.peak_rss_mb = self._peak / 2**20
        if self._heap_start is not None:
            self.result.peak_heap_mb = (self._heap_peak - self._heap_start) / 2**20
