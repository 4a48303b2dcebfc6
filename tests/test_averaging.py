"""Averages of tensors and state dicts (mergebench_core.engine.averaging) against hand-computed answers, and the
accumulation-dtype rule: float64 gives the correctly rounded mean, and for two tensors float32 gives the same bits."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from mergebench_core.engine.averaging import (
    inverse_norm_weights,
    mean_state,
    mean_tensor,
    normalized,
    weighted_mean,
    weighted_sum,
)


def exact_mean(values: list[float]) -> float:
    """The mean of float32 values rounded once to float32 (Fraction arithmetic is exact)."""
    mean = sum(Fraction(v) for v in values) / len(values)
    return float(torch.tensor(float(mean), dtype=torch.float64).to(torch.float32))


def test_float64_accumulation_is_the_correctly_rounded_mean_of_three():
    tiny = 2.0 ** -24  # 1 + 2^-24 rounds back to 1 in float32, so a float32 sum loses both
    values = [1.0, tiny, tiny]
    tensors = [torch.tensor([v], dtype=torch.float32) for v in values]
    got = mean_tensor(tensors, torch.float64).to(torch.float32)
    assert got.item() == exact_mean(values) != 1.0 / 3.0


def test_for_two_tensors_float32_and_float64_give_the_same_bits():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(10_000, generator=g) * torch.rand(10_000, generator=g) * 1e3 for _ in range(2))
    low = mean_tensor([a, b], torch.float32)
    high = mean_tensor([a, b], torch.float64).to(torch.float32)
    assert torch.equal(low.view(torch.int32), high.view(torch.int32))
    assert low[0].item() == exact_mean([a[0].item(), b[0].item()])


def test_mean_state_keeps_dtypes_and_takes_integer_tensors_from_keep():
    states = [{"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "steps": torch.tensor(i)} for i in (3, 5)]
    states[1]["w"] = torch.tensor([3.0, 6.0], dtype=torch.float16)
    merged = mean_state(states)
    assert merged["w"].dtype == torch.float16 and merged["w"].tolist() == [2.0, 4.0]
    assert merged["steps"].item() == 3  # the first state's, not an average of counters
    assert mean_state(states, keep={"steps": torch.tensor(9)})["steps"].item() == 9
    with pytest.raises(ValueError, match="at least one"):
        mean_state([])


def test_weighted_sum_and_normalized_weights():
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.0])]
    assert weighted_sum(tensors, normalized([3, 1])).tolist() == [1.75, 1.5]  # 3/4 · x1 + 1/4 · x2
    assert normalized([2, 1]) == [2 / 3, 1 / 3]
    with pytest.raises(ValueError, match="sum to zero"):
        normalized([1, -1])
    with pytest.raises(ValueError, match="one weight per tensor"):
        weighted_sum(tensors, [1.0])


def test_weighted_mean_by_entry_and_by_tensor():
    tensors = [torch.tensor([1.0, 4.0]), torch.tensor([3.0, 0.0])]
    weights = [torch.tensor([1.5, 0.5]), torch.tensor([3.5, 0.5])]
    # entry 0: (1.5·1 + 3.5·3) / 5 = 2.4; entry 1: equal weights, the plain mean 2
    torch.testing.assert_close(weighted_mean(tensors, weights), torch.tensor([2.4, 2.0]))
    # scales multiply each tensor's weights: entry 0 becomes (3·1 + 3.5·3) / 6.5, entry 1 (1·4 + 0.5·0) / 1.5
    torch.testing.assert_close(weighted_mean(tensors, weights, [2.0, 1.0]), torch.tensor([13.5 / 6.5, 8 / 3]))
    half = weighted_mean([t.half() for t in tensors], weights)
    assert half.dtype == torch.float16  # accumulated in float32, returned in the tensors' dtype


def test_inverse_norm_weights():
    states = [{"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, {"a": torch.tensor([0.0, 1.0])}]  # norms 5, 1
    assert inverse_norm_weights(states) == pytest.approx([1 / 6, 5 / 6])
    assert inverse_norm_weights(states, floor=1.0) == pytest.approx([0.25, 0.75])  # 1/6 : 1/2
