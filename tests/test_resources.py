"""A cell's peak memory is its own: what it allocated, not what earlier cells left behind."""

import pytest
import torch

from mergebench_core.running.resources import heap_in_use_bytes, measure

pytestmark = pytest.mark.skipif(heap_in_use_bytes() is None, reason="needs glibc's allocator statistics")


def allocate(mb: int) -> None:
    t = torch.empty(mb * 2**18)  # float32: 4 bytes each
    t.fill_(1.0)
    del t


def test_the_peak_is_what_the_code_allocated_whatever_ran_before():
    with measure() as first:
        allocate(80)
    kept = torch.ones(60 * 2**18)  # an earlier cell that left 60 MB allocated
    with measure() as second:
        allocate(80)
    del kept
    for m in (first, second):
        assert 79 < m.peak_mb < 90, m
    assert abs(first.peak_mb - second.peak_mb) < 5


def test_nothing_allocated_is_near_zero():
    with measure() as m:
        sum(range(1000))
    assert m.peak_mb < 5
