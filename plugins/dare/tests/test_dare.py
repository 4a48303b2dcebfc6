"""DARE: closed-form limits (p = 0 is TA / TIES), the drop-and-rescale invariant, seeding, and the embedded pool."""

import pytest
import torch

from mergebench_core import RunContext
from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.errors import ConfigError
from mergebench_core.data.evaluation import evaluate
from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource
from mergebench_dare import DareTaskArithmetic, DareTies, TaParams, TiesParams


def merge(method, base, experts, seed=0, block_entries=1 << 22):
    out = {}
    merge_sources(method, StateDictSource(base, "base"),
                  [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out, seed=seed,
                  block_entries=block_entries)
    return out


torch.manual_seed(0)
BASE = {"w": torch.randn(64, 32), "b": torch.randn(32)}
EXPERTS = [{k: v + torch.randn_like(v) for k, v in BASE.items()} for _ in range(3)]


def test_p_zero_is_task_arithmetic():
    out = merge(DareTaskArithmetic(TaParams(p=0.0, scaling_factor=0.3)), BASE, EXPERTS)
    for k in BASE:
        expected = BASE[k] + 0.3 * sum(e[k] - BASE[k] for e in EXPERTS)
        assert torch.allclose(out[k], expected, atol=1e-6)


def test_each_entry_is_dropped_or_rescaled_by_one_over_one_minus_p():
    # One expert, λ = 1: every merged τ entry is either 0 (dropped) or τ/(1 − p) = 4τ for p = 0.75.
    base = {"w": torch.zeros(100, 100)}
    tau = torch.rand(100, 100) + 0.5  # no zeros, so dropped and kept entries are told apart
    out = merge(DareTaskArithmetic(TaParams(p=0.75, scaling_factor=1.0)), base, [{"w": tau}])
    kept = out["w"] != 0
    assert torch.allclose(out["w"][kept], 4 * tau[kept])
    assert abs(kept.float().mean().item() - 0.25) < 0.02  # 10,000 Bernoulli(0.25) draws: σ ≈ 0.004
    no_rescale = merge(DareTaskArithmetic(TaParams(p=0.75, rescale=False, scaling_factor=1.0)), base, [{"w": tau}])
    assert torch.allclose(no_rescale["w"], out["w"] / 4)  # same seed, same mask, no rescaling


def test_experts_get_independent_masks():
    base = {"w": torch.zeros(2000)}
    experts = [{"w": torch.ones(2000)}, {"w": 2 * torch.ones(2000)}]
    out = merge(DareTaskArithmetic(TaParams(p=0.5, scaling_factor=1.0)), base, experts)
    # values: 0 (both dropped), 2 (only the first kept), 4 (only the second), 6 (both) – each about 1/4 of entries
    values, counts = torch.unique(out["w"], return_counts=True)
    assert values.tolist() == [0.0, 2.0, 4.0, 6.0]
    assert all(abs(c / 2000 - 0.25) < 0.05 for c in counts.tolist())


@pytest.mark.parametrize("method", [DareTaskArithmetic(TaParams()), DareTies(TiesParams())])
def test_same_seed_same_output_different_seed_different_output(method):
    a = merge(method, BASE, EXPERTS, seed=1)
    b = merge(method, BASE, EXPERTS, seed=1)
    c = merge(method, BASE, EXPERTS, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in BASE)
    assert not torch.equal(a["w"], c["w"])


def test_dare_ties_with_p_zero_matches_hand_computed_ties():
    # k = 0.5 of 4 entries keeps 2 per task (as in the TIES tests):
    #   τ1 = [2, -3, 1, 0] -> [2, -3, 0, 0];  τ2 = [4, 1, -1, 1] -> [4, 1, 0, 0];  τ3 = [-1, -2, 0, 5] -> [0, -2, 0, 5]
    # elected signs of the sum [6, -4, 0, 5]: [+, -, + (a zero sum), +]; agreeing sum = [6, -5, 0, 5]; λ = 0.5
    base = {"w": torch.zeros(4)}
    experts = [{"w": torch.tensor(v)} for v in ([2.0, -3.0, 1.0, 0.0], [4.0, 1.0, -1.0, 1.0], [-1.0, -2.0, 0.0, 5.0])]
    for scope in ("global", "tensor"):
        out = merge(DareTies(TiesParams(p=0.0, k=0.5, scope=scope)), base, experts)
        assert torch.allclose(out["w"], torch.tensor([3.0, -2.5, 0.0, 2.5]))


def test_dare_ties_global_keeps_k_of_the_dropped_entries():
    # One expert: TIES keeps exactly ⌊0.2·n⌋ entries of the dropped vector, all among its survivors.
    base = {"a": torch.zeros(300), "b": torch.zeros(200)}
    expert = {"a": torch.rand(300) + 0.1, "b": torch.rand(200) + 0.1}
    method = DareTies(TiesParams(p=0.5, k=0.2, scaling_factor=1.0))
    out = merge(method, base, [expert])
    assert method.extras["kept_per_task"] == 100
    assert sum(int((out[k] != 0).sum()) for k in out) == 100
    dropped = merge(DareTaskArithmetic(TaParams(p=0.5, scaling_factor=1.0)), base, [expert])
    for k in out:  # kept entries are the same rescaled values the TA variant sees (same seed, same masks)
        nz = out[k] != 0
        assert torch.equal(out[k][nz], dropped[k][nz])


def test_the_drop_hash_is_the_documented_function():
    from mergebench_core.engine.task_vector_stages import drop_keep, drop_salt, hash32

    # the tensor hash (int32 arithmetic wrapping modulo 2^32) equals the pure-Python one, for indices on both
    # sides of 2^31 and 2^32, through the fast range path and the general index path
    salt = drop_salt(3, "w", 1)
    index = [0, 1, 12345, (1 << 31) - 1, 1 << 31, (1 << 32) + 5]
    expected = [float(hash32(salt ^ (i & 0xFFFFFFFF) ^ (((i >> 32) * 0x27D4EB2F) & 0xFFFFFFFF)) & 0x7FFFFFFF
                      >= round(0.3 * (1 << 31))) for i in index]
    assert drop_keep(3, "w", 1, torch.tensor(index), 0.3).tolist() == expected
    assert drop_keep(3, "w", 1, range(0, 3), 0.3).tolist() == expected[:2] + [
        float(hash32(salt ^ 2) & 0x7FFFFFFF >= round(0.3 * (1 << 31)))]
    assert torch.equal(drop_keep(3, "w", 1, range(10, 5000), 0.3), drop_keep(3, "w", 1, torch.arange(10, 5000), 0.3))


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_streaming_equals_the_reference_in_blocks(scope):
    from mergebench_core.testing import reference_outputs

    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(60, 50, generator=g), "b": torch.randn(3000, generator=g), "s": torch.randn(())}
    experts = [{k: v + torch.randint(-3, 4, v.shape, generator=g) * 0.5 for k, v in base.items()} for _ in range(3)]
    for method in (DareTaskArithmetic(TaParams(p=0.4)), DareTies(TiesParams(p=0.3, k=0.3, scope=scope))):
        want = reference_outputs(method.pipeline(), base, experts, seed=7)
        for block in (1 << 22, 1000):
            got = merge(method, base, experts, seed=7, block_entries=block)
            assert all(torch.equal(got[k], want[k]) for k in base), (method.name, block)


def test_zero_task_vectors_return_the_base():
    out = merge(DareTies(TiesParams()), BASE, [BASE, BASE])
    assert all(torch.equal(out[k], BASE[k]) for k in BASE)


def test_bad_parameters_are_refused():
    with pytest.raises(ConfigError, match=r"p \(the drop probability\) must be in \[0, 1\)"):
        build_params("dare_ta", TaParams, {}, parse_overrides(["dare_ta.p=1.0"]))
    with pytest.raises(ConfigError, match="combine must be"):
        build_params("dare_ties", TiesParams, {}, parse_overrides(["dare_ties.combine=max"]))


def test_on_the_embedded_pool(digits_pools):
    pool, taskpool = digits_pools
    out = DareTaskArithmetic().run(pool, RunContext(taskpool=taskpool, seed=0))
    metrics = evaluate(taskpool, out.model)
    mean = sum(m["accuracy"] for m in metrics.values()) / len(metrics)
    pretrained = evaluate(taskpool, pool.load_model("_pretrained_"))
    pre_mean = sum(m["accuracy"] for m in pretrained.values()) / len(pretrained)
    assert 0.3 < mean <= 1.0 and mean > pre_mean  # merging the experts helps over the pretrained model
