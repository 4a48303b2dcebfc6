"""PCB against an independent numpy transcription of the paper's formulas (sorted-position quantiles over the
flattened model, in float64), against a closed form in its limit, and on bad parameters."""

import numpy as np
import pytest
import torch
from mergebench_pcb import Params, Pcb

from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.engine.data_free import merge_sources
from mergebench_core.engine.sources import StateDictSource
from mergebench_core.errors import ConfigError


def merge(params, base, experts, block_entries=1 << 22):
    out = {}
    merge_sources(Pcb(params), StateDictSource(base, "base"),
                  [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out, block_entries=block_entries)
    return out


def numpy_pcb(base: dict, experts: list, ratio: float, clip: float, lam: float) -> dict:
    keys = list(base)
    flat0 = np.concatenate([base[k].double().numpy().ravel() for k in keys])
    taus = np.stack([np.concatenate([e[k].double().numpy().ravel() for k in keys]) - flat0 for e in experts])
    n, d = taus.shape
    srt = np.sort(np.abs(taus), axis=1)
    lo, hi = srt[:, int(d * clip)][:, None], srt[:, int(d * (1 - clip) - 1)][:, None]
    mags = np.clip(np.abs(taus), lo, hi)
    intra = np.exp(n * ((mags - lo) / (hi - lo)) ** 2)
    inter = np.tanh(taus * taus.sum(0))
    score = intra * inter
    q = np.sort(score, axis=1)[:, int(d * (1 - ratio))][:, None]
    top = score.max(1, keepdims=True)
    w = (np.maximum(score, q) - q) / (top - q)
    merged = (np.sign(taus) * mags * w).sum(0) / np.maximum(w.sum(0), 1e-12)
    flat = flat0 + lam * merged
    out, at = {}, 0
    for k in keys:
        size = base[k].numel()
        out[k] = torch.from_numpy(flat[at:at + size].reshape(base[k].shape))
        at += size
    return out


def random_model(seed: int, tasks: int):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(20, 30, generator=g), "b": torch.randn(30, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(tasks)]
    return base, experts


@pytest.mark.parametrize("ratio,clip,block", [(0.1, 0.0001, 1 << 22), (0.2, 0.01, 37), (1.0, 0.0, 100)])
def test_matches_the_papers_formulas_over_the_flattened_model(ratio, clip, block):
    base, experts = random_model(0, 3)
    out = merge(Params(ratio=ratio, clip_ratio=clip, scaling_factor=1.2), base, experts, block_entries=block)
    want = numpy_pcb(base, experts, ratio, clip, 1.2)
    for k in base:
        assert torch.allclose(out[k].double(), want[k], atol=1e-5), k


def test_a_hand_computed_case():
    # one tensor, T = 2, d = 4, no clip (clip_ratio 0: lo, hi = min, max of |τ_t|), ratio 0.5, λ = 1
    #   τ1 = [2, -1, 0, 1]   τ2 = [1, 1, -2, 0]   Στ = [3, 0, -2, 1]
    #   intra_t = exp(2·((|τ| − min)/(max − min))²):  task 1 min 0, max 2 -> [e², e^0.5, 1, e^0.5]
    #                                                 task 2 min 0, max 2 -> [e^0.5, e^0.5, e², 1]
    #   inter_t = tanh(τ_t·Στ):  task 1 [tanh 6, 0, 0, tanh 1]; task 2 [tanh 3, 0, tanh 4, 0]
    #   score_1 = [e² tanh 6, 0, 0, e^0.5 tanh 1]; score_2 = [e^0.5 tanh 3, 0, e² tanh 4, 0]
    #   ratio 0.5: q = sorted position ⌊4·0.5⌋ = 2 (the 3rd smallest): task 1 e^0.5 tanh 1, task 2 e^0.5 tanh 3
    #   w_1 = [1, 0, 0, 0] (the 4th entry sits at q, so its weight is 0); w_2 = [0, 0, 1, 0]
    #   merged = [2·1/1, 0, −2·1/1, 0] = [2, 0, -2, 0]
    base = {"w": torch.zeros(4)}
    experts = [{"w": torch.tensor([2.0, -1.0, 0.0, 1.0])}, {"w": torch.tensor([1.0, 1.0, -2.0, 0.0])}]
    out = merge(Params(ratio=0.5, clip_ratio=0.0, scaling_factor=1.0), base, experts)
    assert torch.allclose(out["w"], torch.tensor([2.0, 0.0, -2.0, 0.0]))


def test_one_task_and_ratio_one_is_the_task_vector_except_at_its_smallest_magnitude():
    # T = 1: inter = tanh(τ²) and intra grow with |τ|, so the score's minimum sits at the smallest |τ|; with
    # ratio 1 the weight (score − min)/(max − min) is > 0 elsewhere and the weighted mean of one vector is itself:
    # θ = θ_0 + λ·τ, except θ_0 where |τ| is smallest (without clipping).
    base, experts = random_model(1, 1)
    out = merge(Params(ratio=1.0, clip_ratio=0.0, scaling_factor=0.7), base, experts)
    taus = {k: experts[0][k] - base[k] for k in base}
    smallest = min(float(t.abs().min()) for t in taus.values())
    for k in base:
        want = torch.where(taus[k].abs() == smallest, base[k], base[k] + 0.7 * taus[k])
        assert torch.allclose(out[k], want, atol=1e-6)


@pytest.mark.parametrize("item,word", [("pcb.ratio=0", "ratio"), ("pcb.ratio=1.5", "ratio"),
                                       ("pcb.clip_ratio=0.5", "clip_ratio"), ("pcb.scaling_factor=nan", "finite")])
def test_bad_parameters_are_refused_with_their_name(item, word):
    with pytest.raises(ConfigError, match=word):
        build_params("pcb", Params, None, parse_overrides([item]))
