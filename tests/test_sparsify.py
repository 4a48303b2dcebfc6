import pytest
import torch

from mergebench_core.sparsify import OnePassTopK, StreamingTopK, bottomk_mask, keep_count, topk_mask


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


def _stream(seed, shapes, experts=3):
    from mergebench_core.merging import MergeStream
    from mergebench_core.tensors import StateDictSource

    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    models = [{k: v + torch.randint(-6, 7, v.shape, generator=g) * 0.125 * (i + 1) for k, v in base.items()}
              for i in range(experts)]
    return MergeStream(list(base), StateDictSource(base), [StateDictSource(m) for m in models])


def _one_pass_masks(stream, topk, block=500):
    kept, tickets = [], []
    for _, taus in stream.task_vectors():
        flat = taus.reshape(len(taus), -1)
        for j in range(0, flat.shape[1], block):
            keep, _ = topk.classify(flat[:, j:j + block])
            kept.append(keep > 0)
            tickets.append(topk.hold(flat[:, j:j + block].clone()))
    return kept, tickets


def test_one_pass_topk_equals_whole_model_topk_with_many_ties():
    for seed in range(6):
        stream = _stream(seed, [(3000,), (50, 90), (5,), (2500,)])
        n = stream.numel()
        counts = [n // 5, 7, n // 2]
        topk = OnePassTopK.from_sample(stream, counts, seed=seed, chunk=64)
        assert bool((topk.lo < topk.hi).any()), "the sample should leave a boundary to settle"
        kept, tickets = _one_pass_masks(stream, topk)
        assert topk.resolve()
        got = torch.cat([k | topk.selected(t) for k, t in zip(kept, tickets)], 1)
        whole = torch.cat([t.reshape(3, -1) for _, t in stream.task_vectors()], 1)
        want = torch.stack([topk_mask(whole[r], counts[r]) for r in range(3)])
        assert torch.equal(got, want)


def test_one_pass_topk_reports_a_missed_bracket():
    stream = _stream(0, [(3000,)])
    n = stream.numel()
    too_low = OnePassTopK([n // 10] * 3, torch.zeros(3), torch.full((3,), 1e-6))  # nearly everything "kept"
    _one_pass_masks(stream, too_low)
    assert not too_low.resolve()
    too_high = OnePassTopK([n // 2] * 3, torch.full((3,), 1e3), torch.full((3,), 1e4))  # nothing reaches lo
    _one_pass_masks(stream, too_high)
    assert not too_high.resolve()


def test_one_pass_topk_is_exact_without_sampling_when_tensors_are_read_whole():
    stream = _stream(1, [(40,), (7, 3)])
    counts = [10, 0, 61]
    topk = OnePassTopK.from_sample(stream, counts)  # every tensor fits in 4 chunks: the "sample" is everything
    kept, tickets = _one_pass_masks(stream, topk)
    assert topk.resolve()
    whole = torch.cat([t.reshape(3, -1) for _, t in stream.task_vectors()], 1)
    boundary = torch.cat([topk.selected(t) for t in tickets], 1)
    assert torch.equal(torch.cat(kept, 1) | boundary,
                       torch.stack([topk_mask(whole[r], counts[r]) for r in range(3)]))
    # lo = hi = the exact threshold, so only entries equal to it are ever in doubt
    assert bool((whole.abs()[boundary] == topk.hi.expand_as(whole)[boundary]).all())
