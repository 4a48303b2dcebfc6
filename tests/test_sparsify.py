import pytest
import torch

from mergebench_core.sparsify import StreamingTopK, bottomk_mask, keep_count, topk_mask


def test_keep_count_is_floor_with_float_guard():
    assert keep_count(0.2, 10) == 2
    assert keep_count(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996
    assert keep_count(0.25, 10) == 2
    assert keep_count(1.0, 7) == 7 and keep_count(0.0, 7) == 0
    with pytest.raises(ValueError):
        keep_count(1.5, 3)


def test_topk_breaks_ties_by_position():
    x = torch.tensor([1.0, -3.0, 2.0, 3.0, -2.0, 2.0])
    assert topk_mask(x, 3).tolist() == [False, True, True, True, False, False]
    assert bottomk_mask(x, 2).tolist() == [True, False, True, False, False, False]


def test_streaming_topk_equals_whole_model_topk_with_many_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        sizes = torch.randint(1, 30, (4,), generator=g).tolist()
        parts = [(torch.randint(-4, 5, (3, s), generator=g) * 0.5).float() for s in sizes]
        whole = torch.cat(parts, 1)
        counts = torch.randint(0, whole.shape[1] + 1, (3,), generator=g).tolist()
        st = StreamingTopK(counts)
        for p in parts:
            st.observe_high(p)
        for p in parts:
            st.observe_low(p)
        got = torch.cat([st.mask(p) for p in parts], 1)
        want = torch.stack([topk_mask(whole[r], counts[r]) for r in range(3)])
        assert torch.equal(got, want)
        assert got.sum(1).tolist() == counts


def test_streaming_topk_handles_tiny_and_huge_magnitudes():
    x = torch.tensor([[1e-38, 3e38, 0.0, -1e-45, 5.0, -3e38]])
    st = StreamingTopK([3])
    st.observe_high(x)
    st.observe_low(x)
    assert st.mask(x).tolist() == [[False, True, False, False, True, True]]
