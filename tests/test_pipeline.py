"""The task-vector pipeline: every combination of its stages, streamed in blocks, equals the plain whole-model
reference bit for bit, on random and on quantised inputs (many equal magnitudes, many exact cancellations); every
element-wise method gives the same bits in blocks as whole; the engine's protocols; the GPU code path on the CPU."""

from __future__ import annotations

import pytest
import torch

from mergebench_core import MethodInfo
from mergebench_core.engine.merging import (
    Block,
    MergeStream,
    TaskVectorMethod,
    TensorMergeMethod,
    TensorSourcePool,
    merge_sources,
    pool_source,
)
from mergebench_core.engine.pipeline import (
    Pipeline,
    TaskVectorPipelineMethod,
    elect_sign,
)
from mergebench_core.engine.tensors import StateDictSource, SupportsReadInto, SupportsReadSlices
from mergebench_core.testing import reference_merge, reference_outputs


def models(seed, quantised, experts=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (120, 50), "conv": (6, 4, 3, 3), "bias": (50,), "big": (4000,), "scalar": (), "one": (1,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    out = []
    for _ in range(experts):
        if quantised:
            out.append({k: (v + torch.randint(-3, 4, v.shape, generator=g) * 0.25).to(dtype) for k, v in base.items()})
        else:
            out.append({k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()})
    return {k: v.to(dtype) for k, v in base.items()}, out


class NoParams:
    pass


class Piped(TaskVectorPipelineMethod):
    """A pipeline method for any `Pipeline` (the tests' own)."""

    name = "piped"
    info = MethodInfo()
    Params = NoParams

    def __init__(self, pipe: Pipeline):
        super().__init__(None)
        self.pipe = pipe

    def pipeline(self) -> Pipeline:
        return self.pipe


PIPELINES = {
    "sum": Pipeline(scale=0.3),
    "drop": Pipeline(drop=0.4, scale=0.5),
    "drop-norescale": Pipeline(drop=0.3, rescale=False),
    "trim-tensor": Pipeline(keep=0.3, scale=0.7),
    "trim-global": Pipeline(keep=0.25, scope="global"),
    "band": Pipeline(keep=0.6, skip_top=0.1),
    "ties-sum": Pipeline(keep=0.2, scope="global", elect=True, scale=0.3),
    "ties-mean-tensor": Pipeline(keep=0.35, elect=True, combine="mean"),
    "dare-ties": Pipeline(drop=0.5, keep=0.3, scope="global", elect=True, combine="mean", scale=0.5),
    "elect-max": Pipeline(elect=True, combine="max"),
    "max": Pipeline(combine="max", scale=0.5),
    "weighted": Pipeline(keep=0.4, elect=True, weights=(2.0, 0.0, 0.5)),
    "weighted-unweighted-election": Pipeline(keep=0.4, scope="global", elect=True, weights=(0.5, 1.5, 1.0),
                                             elect_on="unweighted", combine="mean"),
    "keep-all-and-none": Pipeline(keep=1.0, skip_top=0.0, elect=True),
    "keep-nothing": Pipeline(keep=0.0, elect=True),
}


def run(method, base, experts, block_entries=1 << 22, seed=0, **kwargs):
    out = {}
    merge_sources(method, StateDictSource(base), [StateDictSource(e) for e in experts], sink=out,
                  block_entries=block_entries, seed=seed, **kwargs)
    return out


@pytest.mark.parametrize("name", sorted(PIPELINES))
@pytest.mark.parametrize("quantised", [False, True])
def test_every_stage_streamed_equals_the_reference(name, quantised):
    pipe = PIPELINES[name]
    for seed in range(2):
        base, experts = models(seed, quantised)
        want = reference_outputs(pipe, base, experts, seed=seed)
        for block in (1 << 22, 1000, 333):
            got = run(Piped(pipe), base, experts, block_entries=block, seed=seed)
            for key in base:
                assert torch.equal(got[key], want[key]), (name, quantised, seed, block, key)


def test_bfloat16_inputs_are_merged_in_float32_and_written_back():
    pipe = PIPELINES["ties-sum"]
    base, experts = models(0, False, dtype=torch.bfloat16)
    got = run(Piped(pipe), base, experts, block_entries=500)
    want = reference_outputs(pipe, base, experts)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in base)


def test_the_reference_trims_exactly_and_elects_plus_on_zero():
    base = {"w": torch.zeros(6)}
    experts = [{"w": torch.tensor([3.0, -1.0, 2.0, 2.0, 0.0, 1.0])},
               {"w": torch.tensor([-3.0, 1.0, 0.0, 0.0, 0.0, -1.0])}]
    ref = reference_merge(Pipeline(keep=0.5, elect=True), base, experts)["w"]
    # task 0 keeps 3, 2, 2 (the two 2s: both fit); task 1 keeps -3, 1 (earlier of the two 1s) and -1
    assert ref.trimmed.tolist() == [[3.0, 0.0, 2.0, 2.0, 0.0, 0.0], [-3.0, 1.0, 0.0, 0.0, 0.0, -1.0]]
    # sums: 0 (+), 1 (+), 2, 2, 0 (+), -1 (-)
    assert ref.sign.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, -1.0]
    assert ref.merged.tolist() == [3.0, 1.0, 2.0, 2.0, 0.0, -1.0]
    up, down = elect_sign(torch.tensor([0.0, -0.0, 1e-30, -1e-30]))
    assert up.tolist() == [1.0, 1.0, 1.0, 0.0] and down.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_a_trim_fraction_rounds_down_per_scope():
    base, experts = models(1, True)
    for scope in ("tensor", "global"):
        pipe = Pipeline(keep=0.3, scope=scope)
        ref = reference_merge(pipe, base, experts)
        kept = {k: int((r.trimmed != 0).sum()) for k, r in ref.items()}
        taus = {k: r.taus for k, r in ref.items()}
        # never more than ⌊0.3·n⌋ per task (fewer only where τ itself is 0)
        if scope == "tensor":
            assert all(kept[k] <= 3 * int(0.3 * taus[k][0].numel() + 1e-9) for k in kept)
        else:
            assert sum(kept.values()) <= 3 * int(0.3 * sum(t[0].numel() for t in taus.values()))


ELEMENTWISE = ["task_arithmetic", "magmax", "simple_average", "weighted_average", "ties", "dare_ta", "dare_ties",
               "breadcrumbs", "consensus", "tall_masks", "emr"]


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_element_wise_methods_give_the_same_bits_in_blocks(name):
    from mergebench_core.contract.registry import get_registry

    cls = get_registry().method(name)
    assert cls.blockwise, name
    base, experts = models(3, True)
    outs = []
    for block in (1 << 22, 777):
        sinks = [{} for _ in experts] if cls.info.task_specific else {}
        merge_sources(cls(), StateDictSource(base), [StateDictSource(e) for e in experts], sink=sinks,
                      block_entries=block)
        outs.append(sinks if cls.info.task_specific else [sinks])
    for whole, blocks in zip(*outs):
        assert all(torch.equal(whole[k], blocks[k]) for k in base), name


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "wudi", "model_stock", "slerp"])
def test_whole_tensor_methods_declare_it(name):
    from mergebench_core.contract.registry import get_registry

    cls = get_registry().method(name)
    assert not cls.blockwise
    base, experts = models(4, False, experts=2)
    # a block size far below the tensors changes nothing: such methods get whole tensors
    a, b = run(cls(), base, experts), run(cls(), base, experts, block_entries=100)
    assert all(torch.equal(a[k], b[k]) for k in base)


def test_prefetch_and_a_pinned_host_path_give_the_same_bits():
    """The GPU code path (a reader thread one block ahead) run on the CPU."""
    pipe = PIPELINES["dare-ties"]
    base, experts = models(5, True)
    want = reference_outputs(pipe, base, experts, seed=3)
    got = run(Piped(pipe), base, experts, block_entries=400, seed=3, prefetch=True)
    assert all(torch.equal(got[k], want[k]) for k in base)


class Median(TensorMergeMethod):
    name = "median_for_test"
    Params = NoParams
    info = MethodInfo()
    requires_base = False
    blockwise = True

    def merge_tensor(self, key, base, experts):
        return torch.stack([e.float() for e in experts]).median(0).values


def test_a_plain_blockwise_method_and_a_sink_without_blocks():
    base, experts = models(6, False)
    whole = run(Median(), base, experts)

    class WholeOnly:  # a Sink that only takes whole tensors: the engine assembles blocks for it
        def __init__(self):
            self.got = {}

        def write(self, key, tensor):
            self.got[key] = tensor

        def patch(self, key, index, values):
            raise AssertionError("no patches expected")

    sink = WholeOnly()
    merge_sources(Median(), None, [StateDictSource(e) for e in experts], sink=sink, block_entries=500)
    assert all(torch.equal(sink.got[k], whole[k]) for k in base)


def test_protocols_not_identity_checks():
    class Pool:
        def tensor_source(self, name):
            return StateDictSource({"w": torch.ones(2)}, name)

    assert isinstance(Pool(), TensorSourcePool) and isinstance(pool_source(Pool(), "x"), StateDictSource)
    src = StateDictSource({"w": torch.arange(10.0)})
    assert isinstance(src, SupportsReadInto) and isinstance(src, SupportsReadSlices)
    out = torch.empty(3)
    src.read_into("w", out, 4)
    assert out.tolist() == [4.0, 5.0, 6.0]

    class Tv(TaskVectorMethod):
        name = "tv_for_test"
        Params = NoParams
        info = MethodInfo()
        blockwise = True

        def merge_task_vectors(self, key, base, taus):
            return base + taus.sum(0)

    base, experts = models(7, False)
    a, b = run(Tv(), base, experts), run(Tv(), base, experts, block_entries=300)
    assert all(torch.equal(a[k], b[k]) for k in base)


def test_streams_read_blocks_and_count_them_as_checked_once():
    base, experts = models(8, False)
    experts[1]["big"][3999] = float("nan")
    stream = MergeStream(list(base), StateDictSource(base), [StateDictSource(e, f"e{i}") for i, e in
                                                               enumerate(experts)], block_entries=1000)
    blocks = stream.blocks("big")
    assert [(b.start, b.stop) for b in blocks] == [(0, 1000), (1000, 2000), (2000, 3000), (3000, 4000)]
    assert isinstance(blocks[0], Block) and not blocks[0].whole and stream.blocks("bias")[0].whole
    from mergebench_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="tensor 'big' in e1 has 1 non-finite"):
        list(stream.task_vector_blocks("big"))


@pytest.mark.parametrize("name", ["trim-tensor", "band", "ties-mean-tensor", "ties-sum", "dare-ties"])
def test_tiny_kernel_chunks_give_the_same_bits(monkeypatch, name):
    """Chunks far smaller than the tensors: kept entries equal to a threshold end inside some chunk, before others,
    after the rest (the positions `Thresholds.locate` finds), and the counting pass runs over many chunks."""
    from mergebench_core.engine import threshold_search

    monkeypatch.setattr(TaskVectorPipelineMethod, "chunk_entries", 3 * 97)
    monkeypatch.setattr(threshold_search, "_CHUNK", 3 * 89)
    pipe = PIPELINES[name]
    base, experts = models(9, True)
    want = reference_outputs(pipe, base, experts, seed=1)
    for block in (1 << 22, 1000):
        got = run(Piped(pipe), base, experts, block_entries=block, seed=1)
        assert all(torch.equal(got[k], want[k]) for k in base), (name, block)


def test_dare_drop_hashed_in_cache_sized_chunks_equals_the_mask_of_the_whole_block():
    """`drop_` hashes a CPU block's mask in chunks (`_DROP_CHUNK`); each entry's mask depends on its index only, so
    the result must equal the definition applied to the whole block at once, across chunk edges and a block start."""
    from mergebench_core.engine import task_vector_stages as stages

    pipe = Pipeline(drop=0.7)
    m = 2 * stages._DROP_CHUNK + 12_345
    taus = torch.randn(3, m, generator=torch.Generator().manual_seed(0))
    expected = taus.clone()
    for t in range(3):
        expected[t] *= stages.drop_keep(5, "layer.weight", t, range(777, 777 + m), 0.7) * (1 / 0.3)
    got = stages.drop_(taus.clone(), pipe, 5, "layer.weight", 777)
    assert torch.equal(got, expected)
    assert 0.25 < float((got != 0).float().mean()) < 0.35  # about 1 - p of the entries survive
