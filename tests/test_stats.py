"""The shared statistics: per-example squared gradients against a hand loop, Gram matrices against a direct product,
and the cache (hits, key mismatches, corrupt files)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core import ModelPool, TaskPool
from mergebench_core.data.statistics import (
    StatsCache,
    StatsKey,
    cached_fisher,
    cached_linear_grams,
    fisher_diagonal,
    forward_order,
    linear_input_grams,
)


class TinyTaskPool(TaskPool):
    """One task of random inputs, with a fixed head of its own (as CLIP's zero-shot heads are)."""

    name = "tiny"

    def __init__(self, n: int = 40, dim: int = 5, classes: int = 3):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.head = nn.Linear(4, classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(classes, 4, generator=g))
        self.head.requires_grad_(False)

    @property
    def tasks(self) -> list[str]:
        return ["a"]

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = (self.x, self.y) if limit is None else (self.x[:limit], self.y[:limit])
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(model(inputs))


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 4)).eval()


class TinyPool(ModelPool):
    name = "tinypool"
    loads = 0

    @property
    def expert_names(self) -> list[str]:
        return ["a"]

    def load_model(self, name: str) -> nn.Module:
        TinyPool.loads += 1
        return tiny_model()


def hand_fisher(model: nn.Module, tp: TinyTaskPool, n: int, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(n):
        model.zero_grad()
        F.cross_entropy(tp.logits(model, "a", tp.x[i:i + 1]), labels[i:i + 1]).backward()
        for k, p in model.named_parameters():
            out[k] += p.grad.pow(2)
    return {k: v / n for k, v in out.items()}


@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_empirical_fisher_equals_hand_loop(per_example):
    tp, model = TinyTaskPool(), tiny_model()
    # 0.001 MB holds the gradients of 3 examples of this 76-parameter model: vmap runs in chunks of 3 within a batch
    got = fisher_diagonal(model, tp, "a", 30, batch_size=7, per_example=per_example, max_grad_memory_mb=0.001)
    want = hand_fisher(tiny_model(), tp, 30, tp.y)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    assert all(float(v.abs().sum()) > 0 for v in got.values())


def test_sampled_fisher_uses_seeded_model_labels():
    tp = TinyTaskPool()
    a = fisher_diagonal(tiny_model(), tp, "a", 40, seed=3, labels="sampled", batch_size=8)
    b = fisher_diagonal(tiny_model(), tp, "a", 40, seed=3, labels="sampled", batch_size=8)
    c = fisher_diagonal(tiny_model(), tp, "a", 40, seed=4, labels="sampled", batch_size=8)
    empirical = fisher_diagonal(tiny_model(), tp, "a", 40, batch_size=8)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert any(not torch.allclose(a[k], c[k]) for k in a)
    assert any(not torch.allclose(a[k], empirical[k]) for k in a)
    # the labels are the ones a seeded generator draws from the model's softmax, one batch at a time
    g = torch.Generator().manual_seed(3)
    model = tiny_model()
    with torch.no_grad():
        probs = torch.softmax(tp.logits(model, "a", tp.x), -1)
    labels = torch.cat([torch.multinomial(probs[i:i + 8], 1, generator=g).squeeze(1) for i in range(0, 40, 8)])
    want = hand_fisher(model, tp, 40, labels)
    for k in want:
        torch.testing.assert_close(a[k], want[k], rtol=1e-5, atol=1e-7)


def test_grams_equal_direct_product_and_stop_early():
    tp, model = TinyTaskPool(), tiny_model()
    grams = linear_input_grams(model, tp, "a", 25, batch_size=10)
    x0 = tp.x[:25]
    torch.testing.assert_close(grams["0"], x0.T @ x0 / 25)
    with torch.no_grad():
        x3 = model[2](model[1](model[0](x0)))
    torch.testing.assert_close(grams["3"], x3.T @ x3 / 25, rtol=1e-5, atol=1e-6)
    only_first = linear_input_grams(model, tp, "a", 25, batch_size=10, modules=["0"])
    assert list(only_first) == ["0"]
    torch.testing.assert_close(only_first["0"], grams["0"])
    assert forward_order(model, tp, "a") == ["0", "3"]


def test_cache_hit_skips_the_computation(tmp_path):
    cache, pool, tp = StatsCache(tmp_path), TinyPool(), TinyTaskPool()
    TinyPool.loads = 0
    first = cached_fisher(cache, pool, "a", tp, "a", n_examples=20, labels="sampled", seed=1)
    second = cached_fisher(cache, pool, "a", tp, "a", n_examples=20, labels="sampled", seed=1)
    assert (cache.misses, cache.hits, TinyPool.loads) == (1, 1, 1)
    for k in first:
        assert torch.equal(first[k], second[k])
    # a different statistic, size or seed is a different entry
    cached_fisher(cache, pool, "a", tp, "a", n_examples=20, labels="sampled", seed=2)
    cached_fisher(cache, pool, "a", tp, "a", n_examples=10, labels="sampled", seed=1)
    cached_fisher(cache, pool, "a", tp, "a", n_examples=20, labels="empirical", seed=1)
    grams = cached_linear_grams(cache, pool, "a", tp, "a", n_examples=20)
    assert cached_linear_grams(cache, pool, "a", tp, "a", n_examples=20)["0"].equal(grams["0"])
    assert (cache.misses, cache.hits) == (5, 2)


def test_mismatching_file_is_recomputed(tmp_path, caplog):
    cache = StatsCache(tmp_path)
    key = StatsKey("pool/a", "tiny/a", "fisher_sampled", 20, 0)
    other = StatsKey("pool/b", "tiny/a", "fisher_sampled", 20, 0)
    cache.save(other, {"w": torch.full((2,), 7.0)})
    cache.path(other).rename(cache.path(key))  # a file under key's name that holds another key's numbers
    with caplog.at_level(logging.WARNING):
        got = cache.get_or_compute(key, lambda: {"w": torch.ones(2)})
    assert torch.equal(got["w"], torch.ones(2)) and cache.misses == 1
    assert "another key" in caplog.text
    assert torch.equal(cache.load(key)["w"], torch.ones(2))  # the bad file was replaced
    # an older code version is another key too
    stale = StatsKey("pool/a", "tiny/a", "fisher_sampled", 20, 0, version=0)
    cache.save(stale, {"w": torch.zeros(2)})
    cache.path(stale).replace(cache.path(key))
    assert torch.equal(cache.get_or_compute(key, lambda: {"w": torch.full((2,), 3.0)})["w"], torch.full((2,), 3.0))


def test_corrupt_file_is_recomputed(tmp_path):
    cache = StatsCache(tmp_path)
    key = StatsKey("pool/a", "tiny/a", "linear_grams", 20, 0)
    cache.path(key).parent.mkdir(parents=True, exist_ok=True)
    cache.path(key).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert cache.load(key) is None
    assert torch.equal(cache.get_or_compute(key, lambda: {"g": torch.eye(2)})["g"], torch.eye(2))
