"""The embedded pool behaves like the CLIP eight-task benchmark in miniature, and is built deterministically."""

import dataclasses

import torch
import torch.nn.functional as F

from mergebench_core import PRETRAINED
from mergebench_core.data.evaluation import evaluate
from mergebench_digits import TASKS, DigitsData, Recipe, build


def test_experts_are_far_above_the_pretrained_model(digits_pools):
    pool, tasks = digits_pools
    assert pool.expert_names == list(TASKS) and len(TASKS) >= 6
    pre = evaluate(tasks, pool.load_model(PRETRAINED))
    for task in TASKS:
        expert = evaluate(tasks, pool.load_model(task), tasks=[task])[task]["accuracy"]
        assert expert > 0.93, task
        assert expert - pre[task]["accuracy"] > 0.15, task


def test_test_split_is_held_out_and_views_differ():
    data = DigitsData(Recipe())
    train_ids = set(data.order[:1200].tolist())
    assert not train_ids & set(data.order[1200:].tolist()) and len(data.order) == 1797
    x_digits, y_digits = data.split("digits", "test")
    x_rot, y_rot = data.split("rot90", "test")
    assert torch.equal(y_digits, y_rot) and not torch.equal(x_digits, x_rot)
    assert set(data.split("parity", "test")[1].tolist()) == {0, 1}


def test_only_the_encoder_is_in_the_pool_and_heads_are_per_task(digits_pools):
    pool, tasks = digits_pools
    keys = set(pool.state_dict("digits"))
    assert keys == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias", "norm.weight",
                    "norm.bias"}
    assert tasks.heads["digits"].out_features == 10 and tasks.heads["parity"].out_features == 2


def test_build_is_deterministic_and_keyed_by_recipe(tmp_path):
    small = dataclasses.replace(Recipe(), pretrain_steps=5, finetune_steps=3,
                                tasks=("digits", "parity"))
    build(small, tmp_path / "a")
    build(small, tmp_path / "b")
    for name in ("_pretrained_", "digits", "parity", "heads"):
        assert (tmp_path / "a" / f"{name}.safetensors").read_bytes() == \
            (tmp_path / "b" / f"{name}.safetensors").read_bytes(), name
    assert small.digest() != Recipe().digest()
    assert dataclasses.replace(small, seed=1).digest() != small.digest()


def test_heads_are_clip_style_zero_shot_heads(digits_pools):
    """Each head is its classes' unit-norm embeddings times one logit scale shared by every task, with no bias; the
    pretrained model classifies each class's probe shot as that class, and the scale calibrates the pretrained model
    on the train splits (a smaller or larger one has a higher cross-entropy)."""
    pool, tasks = digits_pools
    scales = torch.cat([tasks.heads[t].weight.norm(dim=1) for t in TASKS])
    assert torch.allclose(scales, scales[0].expand_as(scales), rtol=1e-5) and 1.0 < float(scales[0]) < 1000.0
    assert all(not tasks.heads[t].bias.any() for t in TASKS)
    pretrained = pool.load_model(PRETRAINED)

    def train_loss(factor: float) -> float:
        total = 0.0
        with torch.no_grad():
            for t in TASKS:
                x, y = tasks.data.split(t, "train")
                total += float(F.cross_entropy(factor * tasks.logits(pretrained, t, x), y))
        return total

    with torch.no_grad():
        for t in TASKS:
            x, y = tasks.data.split(t, "train")
            shots = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(int(y.max()) + 1)])
            logits = tasks.logits(pretrained, t, x[shots])
            assert torch.equal(logits.argmax(-1), y[shots]), t
            assert torch.allclose(logits.max(-1).values, scales[0].expand(len(shots)), rtol=1e-4), t  # cosine 1
    assert train_loss(1.0) < min(train_loss(0.9), train_loss(1.1))
