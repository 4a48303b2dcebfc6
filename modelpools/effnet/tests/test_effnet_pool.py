"""effnet-lite0-digits_TA8: real ImageNet weights loaded safely, a deterministic cached build keyed by the pool's
parameters, batch norm that fine-tuning changes, and prototype heads that make the pretrained model a classifier.

Every test uses a tiny recipe (two tasks that share one view, two fine-tuning steps of four images), so the whole
file runs in well under a minute on 2 cores; the full build is measured in the README, not here.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

me = pytest.importorskip("mergebench_effnet")

from mergebench_core import PRETRAINED
from mergebench_core.errors import CheckpointError
from mergebench_core.data.evaluation import evaluate
from mergebench_core.engine.tensors import load_state_dict

TASKS = ("digits", "parity")  # one view of the images: the base embeds 1,200 train images once
TINY = me.EffnetParams(steps=2, batch_size=4)


def test_the_recipe_is_bounded_where_it_is_declared():
    """Values a build cannot finish with are refused when the parameters are made (lr=1e308 was accepted once)."""
    for changes, message in (({"lr": 1e308}, "lr must be at most 10.0"), ({"lr": 0.0}, "lr must be greater than"),
                             ({"steps": 10**12}, "steps must be at most 1000000"),
                             ({"batch_size": 10**6}, "batch_size must be at most 100000"),
                             ({"seed": -1}, "seed must be at least 0")):
        with pytest.raises(ValueError, match=message):
            me.EffnetParams(**changes)
    assert me.EffnetParams(lr=10.0, steps=10**6, batch_size=10**5).lr == 10.0  # the bounds are inclusive


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("effnet-cache")


@pytest.fixture(scope="module")
def pools(root):
    pool = me.EffnetModelPool(TINY, root, tasks=TASKS)
    assert pool.folder.is_dir()  # builds the base and the tiny experts once for the module
    return pool, me.EffnetTaskPool(root, tasks=TASKS)


def test_the_real_pretrained_weights_load_offline_without_unpickling(monkeypatch):
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    state = me.pretrained_state_dict()
    assert calls and all(kw.get("weights_only") is True for kw in calls)
    model = me.EffnetLite0Features()
    assert set(state) == set(model.state_dict())  # the classifier is gone, nothing else is
    model.load_state_dict(state)
    params = sum(p.numel() for p in model.parameters())
    assert params == 3_371_008  # 4.65 M with the ImageNet classifier
    pointwise = sum(p.numel() for p in model.parameters() if p.dim() == 4 and p.shape[-2:] == (1, 1))
    assert 0.93 < pointwise / params < 0.94
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 49
    # trained statistics, not an initialisation: running variances are not all one
    assert not torch.allclose(state["_bn1.running_var"], torch.ones_like(state["_bn1.running_var"]))
    with torch.no_grad():
        feats = model.eval()(me.preprocess(torch.rand(3, 64)))
    assert feats.shape == (3, 1280) and torch.isfinite(feats).all()


def test_a_hostile_weights_file_is_refused_not_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "efficientnet-lite0.pth"
    hostile.write_bytes(pickle.dumps(_Hostile(str(marker)), protocol=2))
    monkeypatch.setattr(me, "weights_path", lambda: hostile)
    with pytest.raises(CheckpointError):
        me.pretrained_state_dict()
    assert not marker.exists()


class _Hostile:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_build_is_deterministic(pools, tmp_path):
    pool, _ = pools
    again = tmp_path / "again"
    me.build_experts(TINY, pool.base, pool.base_folder, again)
    for t in TASKS:
        assert (pool.folder / f"{t}.safetensors").read_bytes() == (again / f"{t}.safetensors").read_bytes(), t
    base_again = tmp_path / "base-again"
    me.build_base(pool.base, base_again)
    for name in (PRETRAINED, "heads"):
        assert (pool.base_folder / f"{name}.safetensors").read_bytes() == \
            (base_again / f"{name}.safetensors").read_bytes(), name


def test_the_cache_is_keyed_by_the_parameters(pools, root):
    pool, _ = pools
    assert pool.name == "effnet-lite0-digits_TA8(batch_size=4,steps=2)"
    assert me.EffnetModelPool().name == me.POOL_NAME == me.effnet_pool().name
    assert me.effnet_pool(me.EffnetParams(lr=3e-5)).name == "effnet-lite0-digits_TA8(lr=3e-05)"
    digests = {me.experts_digest(p, pool.base) for p in
               (TINY, dataclasses.replace(TINY, lr=3e-5), dataclasses.replace(TINY, seed=1),
                dataclasses.replace(TINY, steps=3), dataclasses.replace(TINY, batch_size=5), me.EffnetParams())}
    assert len(digests) == 6
    assert pool.folder.name == me.experts_digest(TINY, pool.base)
    # another seed: another folder, other experts, the same pretrained model and heads
    other = me.EffnetModelPool(dataclasses.replace(TINY, seed=1), root, tasks=TASKS)
    assert other.folder != pool.folder and other.base_folder == pool.base_folder
    assert not torch.equal(other.state_dict("digits")["_conv_stem.weight"], pool.state_dict("digits")["_conv_stem.weight"])
    assert pool.identity("digits") != other.identity("digits") and pool.identity(PRETRAINED) == other.identity(PRETRAINED)
    with pytest.raises(ValueError):
        me.EffnetParams(lr=0.0)


def test_fine_tuning_changes_the_batch_norm_statistics(pools):
    pool, _ = pools
    pre, expert = pool.state_dict(PRETRAINED), pool.state_dict("digits")
    assert set(pre) == set(expert)
    stats = [k for k in pre if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 49
    assert all(not torch.equal(pre[k], expert[k]) for k in stats)
    assert not torch.equal(pre["_blocks.0._depthwise_conv.weight"], expert["_blocks.0._depthwise_conv.weight"])
    # the counters (unused with a fixed momentum) keep the pretrained value, so integer buffers agree across models
    counters = [k for k in pre if k.endswith("num_batches_tracked")]
    assert counters and all(torch.equal(pre[k], expert[k]) for k in counters)
    model = pool.load_model("digits")
    assert not model.training and isinstance(model, me.EffnetLite0Features)


def test_the_prototype_heads_make_the_pretrained_model_a_classifier(pools):
    pool, tasks = pools
    assert tasks.heads["digits"].shape == (10, 1280) and tasks.heads["parity"].shape == (2, 1280)
    assert not tasks.heads["digits"].is_inference() and not tasks.heads["digits"].requires_grad
    scores = evaluate(tasks, pool.load_model(PRETRAINED), tasks=["digits"], limit=200)
    assert scores["digits"]["accuracy"] > 0.3  # chance: 0.1
    assert tasks.num_examples("digits", "val") == 120 and tasks.num_examples("digits", "test") == 597
    x, y = next(iter(tasks.batches("digits", "val", batch_size=8)))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)


def test_logits_are_safe_under_torch_func(pools):
    pool, tasks = pools
    model = pool.load_model(PRETRAINED)
    x, y = next(iter(tasks.batches("parity", "train", batch_size=4)))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    heads_before = {t: h.clone() for t, h in tasks.heads.items()}

    def loss(p):
        out = tasks.logits(lambda inp: torch.func.functional_call(model, (p, buffers), (inp,)), "parity", x)
        return torch.nn.functional.cross_entropy(out, y)

    grads = torch.func.grad(loss)(params)
    assert set(grads) == set(params) and all(torch.isfinite(g).all() for g in grads.values())
    assert all(torch.equal(heads_before[t], tasks.heads[t]) for t in TASKS)


def test_a_damaged_or_hostile_cache_file_is_rebuilt_not_unpickled(root, tmp_path):
    params = dataclasses.replace(TINY, seed=7)
    pool = me.EffnetModelPool(params, root, tasks=TASKS)
    folder = pool.folder
    good = (folder / "digits.safetensors").read_bytes()
    marker = tmp_path / "pwned"
    (folder / "digits.safetensors").write_bytes(pickle.dumps(_Hostile(str(marker)), protocol=2))
    heads = pool.base_folder / "heads.safetensors"
    heads_bytes = heads.read_bytes()
    heads.write_bytes(heads_bytes[: len(heads_bytes) // 2])  # torn
    again = me.EffnetModelPool(params, root, tasks=TASKS)
    assert again.state_dict("digits").keys() == load_state_dict(folder / "digits.safetensors").keys()
    assert (folder / "digits.safetensors").read_bytes() == good
    assert heads.read_bytes() == heads_bytes
    assert not marker.exists()


def test_the_pool_registers_with_its_parameters():
    from mergebench_core.contract.registry import build_registry

    registry = build_registry(entry_points=[], extra_modules=[me])
    reg = registry.modelpool(me.POOL_NAME)
    assert getattr(reg, "params", me.EffnetParams) is me.EffnetParams
    assert registry.taskpool(me.TASKPOOL_NAME).obj().name == me.TASKPOOL_NAME
    pool = reg.obj(me.EffnetParams(lr=3e-5))  # nothing is built until a model is asked for
    assert pool.params.lr == 3e-5 and pool.default_taskpool == me.TASKPOOL_NAME
    assert pool.missing_resources() == []
