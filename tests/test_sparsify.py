import pytest
import torch

from mergebench_core.engine.sparsify import (
    StreamingTopK,
    bottomk_mask,
    build_sample,
    find_thresholds,
    keep_count,
    sample_plan,
    topk_mask,
)


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


def _rows(seed, widths, rows=3):
    """Blocks of magnitudes on a coarse grid: many equal values at every threshold."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 9, (rows, w), generator=g) * 0.125).float() for w in widths]


def _sample(blocks, seed=0, rate=1 / 8, chunk=16):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for b in blocks:
        starts, length = sample_plan(b.shape[1], g, rate, chunk)
        index = (torch.tensor(starts).view(-1, 1) + torch.arange(length)).view(-1)
        parts.append((b[:, index], len(starts), b.shape[1]))
    return build_sample(parts)


def test_thresholds_equal_whole_model_topk_for_any_blocks_with_many_ties():
    for seed in range(8):
        blocks = _rows(seed, [300, 1, 97, 500, 40])
        whole = torch.cat(blocks, 1)
        n = whole.shape[1]
        for counts in ([n // 5, 7, n // 2], [0, n, 1], [n - 1, 3, 100]):
            selection, held = find_thresholds(counts, _sample(blocks, seed), lambda blocks=blocks: blocks)
            assert held
            want = torch.stack([topk_mask(whole[r], counts[r]) for r in range(3)])
            # applied to blocks of another size than it was counted in: the same mask
            got = torch.cat([selection.mask(whole[:, j:j + 37], start=j) for j in range(0, n, 37)], 1)
            assert torch.equal(got > 0, want), (seed, counts)
            assert got.sum(1).tolist() == counts


def test_a_missed_bracket_falls_back_to_the_exact_radix_select(monkeypatch):
    from mergebench_core.engine import threshold_search

    blocks = _rows(1, [400, 250])
    whole = torch.cat(blocks, 1)
    counts = [100, 5, 640]
    monkeypatch.setattr(threshold_search, "_bracket", lambda *a, **k: (0.0, 0.01))  # far too low: too many above
    monkeypatch.setattr(threshold_search, "_bracket_uniform",
                        lambda sample, counts, z: (torch.zeros(len(counts)), torch.full((len(counts),), 0.01)))
    selection, held = find_thresholds(counts, _sample(blocks), lambda: blocks)
    assert not held
    assert torch.equal(selection.mask(whole, start=0) > 0,
                       torch.stack([topk_mask(whole[r], counts[r]) for r in range(3)]))


def test_a_whole_tensor_sample_gives_the_exact_bracket():
    blocks = _rows(2, [40, 21])
    whole = torch.cat(blocks, 1)
    counts = [10, 0, 61]
    sample = _sample(blocks, chunk=1024)  # every tensor fits in 4 chunks: the "sample" is everything
    assert sample.strata == []
    selection, held = find_thresholds(counts, sample, lambda: blocks)
    assert held and torch.equal(selection.mask(whole, start=0) > 0,
                                torch.stack([topk_mask(whole[r], counts[r]) for r in range(3)]))


def test_many_equal_magnitudes_inside_a_given_bracket_are_kept_in_stream_order():
    from mergebench_core.engine.threshold_search import Bracket

    blocks = _rows(6, [500, 321])  # magnitudes on a grid of 1/8: long runs of equal values inside each bracket
    whole = torch.cat(blocks, 1)
    counts = [300, 10, 500]
    bracket = Bracket(torch.tensor([0.25, 0.5, 0.125]), torch.tensor([0.75, 1.0, 0.75]))
    selection, held = find_thresholds(counts, bracket, lambda: blocks)
    assert held
    got = torch.cat([selection.mask(whole[:, j:j + 50], start=j) for j in range(0, whole.shape[1], 50)], 1)
    assert torch.equal(got > 0, torch.stack([topk_mask(whole[r], counts[r]) for r in range(3)]))


def test_streaming_topk_thresholds_equal_its_mask():
    blocks = _rows(3, [50, 70])
    st = StreamingTopK([30, 0, 120])
    for b in blocks:
        st.observe_high(b)
    for b in blocks:
        st.observe_low(b)
    thresholds = st.thresholds()
    whole = torch.cat(blocks, 1)
    assert torch.equal(thresholds.mask(whole) > 0, st.mask(whole))


def test_thresholds_over_blocks_wider_than_a_chunk(monkeypatch):
    from mergebench_core.engine import threshold_search

    monkeypatch.setattr(threshold_search, "_CHUNK", 3 * 1000)  # chunks of 1,000 columns (500 for the band's 6 rows)
    blocks = _rows(4, [70_001, 1_234])  # many chunks per block, and partial ones
    whole = torch.cat(blocks, 1)
    counts = [20_000, 5, 71_000]
    selection, held = find_thresholds(counts, _sample(blocks, rate=1 / 64, chunk=256), lambda: blocks)
    assert held
    assert torch.equal(selection.mask(whole, start=0) > 0,
                       torch.stack([topk_mask(whole[r], counts[r]) for r in range(3)]))
    band, _ = find_thresholds(counts + [10, 0, 3], _sample([torch.cat([b, b]) for b in blocks], chunk=256),
                              lambda: blocks, repeat=2)
    want = torch.stack([topk_mask(whole[r % 3], c) for r, c in enumerate(counts + [10, 0, 3])])
    assert torch.equal(band.mask(torch.cat([whole, whole]).abs(), start=0) > 0, torch.cat([want[:3], want[3:]]))


def test_sparse_nonzero_finds_every_entry():
    from mergebench_core.engine.threshold_search import _nonzero_sparse

    g = torch.Generator().manual_seed(0)
    for n in (0, 5, 16, 1000, 4099):
        for p in (0.0, 0.01, 0.3, 1.0):
            flags = (torch.rand(n, generator=g) < p).float()
            assert torch.equal(_nonzero_sparse(flags), torch.nonzero(flags).view(-1)), (n, p)


def test_rows_with_and_without_an_interior_in_one_chunk():
    # row 0's bracket is one value (lo = hi), row 1's is wide, row 2's sits above everything (nothing inside)
    blocks = _rows(5, [300, 41])
    whole = torch.cat(blocks, 1)
    counts = [100, 150, 0]
    exact = [torch.topk(whole[r], max(c, 1)).values.min().item() for r, c in enumerate(counts)]
    lo = torch.tensor([exact[0], 0.125, 10.0])
    hi = torch.tensor([exact[0], 0.875, 10.0])
    from mergebench_core.engine.threshold_search import Bracket

    selection, held = find_thresholds(counts, Bracket(lo, hi), lambda: blocks)
    assert held
    assert torch.equal(selection.mask(whole, start=0) > 0,
                       torch.stack([topk_mask(whole[r], counts[r]) for r in range(3)]))


def test_the_vectorised_bracket_equals_the_row_by_row_one():
    from mergebench_core.engine.threshold_search import _bracket, _bracket_uniform

    for width, chunks in ((3000, 50), (700, 1)):
        for seed in range(5):
            g = torch.Generator().manual_seed(seed)
            x = (torch.randint(0, 40, (4, width), generator=g) * 0.01).float()
            n = width * 64 if chunks > 1 else width
            sample = build_sample([(x, chunks, n)])
            counts = [0, n // 5, n // 2 + 3, n]
            lo, hi = _bracket_uniform(sample, counts, 6.0)
            for r, k in enumerate(counts):
                assert (float(lo[r]), float(hi[r])) == _bracket(x[r], sample.weights, sample.strata, k, 6.0), \
                    (width, seed, k)


@pytest.mark.parametrize("quantised", [False, True])
def test_many_kept_magnitudes_turn_into_a_histogram(monkeypatch, quantised):
    """A bracket wide enough that its magnitudes pass the flush size: counted as bit patterns, still exact."""
    from mergebench_core.engine import threshold_search

    monkeypatch.setattr(threshold_search, "_FLUSH", 50)
    monkeypatch.setattr(threshold_search, "_MAX_BINS", 1 << 24)
    monkeypatch.setattr(threshold_search, "_CHUNK", 3 * 64)
    g = torch.Generator().manual_seed(7)
    blocks = [(torch.randint(1, 200, (3, w), generator=g) * 2.0**-8).float() if quantised
              else torch.rand(3, w, generator=g) for w in (900, 1100, 40)]
    whole = torch.cat(blocks, 1)
    counts = [400, 1000, 7]
    lo = torch.tensor([float(torch.topk(whole[r], c + 150).values.min()) for r, c in enumerate(counts)])
    hi = torch.tensor([float(torch.topk(whole[r], max(c - 150, 1)).values.min()) for r, c in enumerate(counts)])
    flushed = []
    bincount = torch.bincount
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: flushed.append(1) or bincount(*a, **k))
    selection, held = find_thresholds(counts, threshold_search.Bracket(lo, hi), lambda: blocks)
    monkeypatch.setattr(torch, "bincount", bincount)
    assert held and len(flushed) >= 3
    if quantised:  # some row's threshold is shared by several entries and its end is counted as they pass
        assert any(left > 0 for left in selection._remaining)
    got = torch.cat([selection.mask(whole[:, j:j + 128], start=j) for j in range(0, whole.shape[1], 128)], 1)
    assert torch.equal(got > 0, torch.stack([topk_mask(whole[r], counts[r]) for r in range(3)]))
