"""linear_scalarization minimises Σ_t r_t L_t (uniform r without a preference)."""

import torch
import torch.nn.functional as F

from mergebench_core import PRETRAINED
from mergebench_core.training.loop import TrainConfig, TrainState
from mergebench_linear_scalarization import LinearScalarization


def batches_and_losses(digits_pools, tasks):
    pool, taskpool = digits_pools
    model = pool.load_model(PRETRAINED)
    batches = {t: next(iter(taskpool.batches(t, "train", batch_size=32))) for t in tasks}
    losses = {t: F.cross_entropy(taskpool.logits(model, t, x), y) for t, (x, y) in batches.items()}
    return model, taskpool, batches, losses


def test_loss_is_the_preference_weighted_sum(digits_pools):
    tasks = ("digits", "parity")
    model, taskpool, batches, losses = batches_and_losses(digits_pools, tasks)
    state = TrainState(1, tasks, torch.device("cpu"), torch.Generator(), taskpool, TrainConfig(),
                       {"preference": {"digits": 0.2, "parity": 0.8}})
    loss, logged = LinearScalarization().loss(model, batches, state)
    assert torch.allclose(loss, 0.2 * losses["digits"] + 0.8 * losses["parity"])
    assert logged["loss/train/parity"] == float(losses["parity"].detach())


def test_without_a_preference_the_tasks_weigh_the_same(digits_pools):
    tasks = ("digits", "parity")
    model, taskpool, batches, losses = batches_and_losses(digits_pools, tasks)
    state = TrainState(1, tasks, torch.device("cpu"), torch.Generator(), taskpool, TrainConfig(),
                       {"preference": None})
    loss, _ = LinearScalarization().loss(model, batches, state)
    assert torch.allclose(loss, (losses["digits"] + losses["parity"]) / 2)


def test_the_typed_preference_weighs_the_tasks(digits_pools):
    tasks = ("digits", "parity")
    model, taskpool, batches, losses = batches_and_losses(digits_pools, tasks)
    state = TrainState(1, tasks, torch.device("cpu"), torch.Generator(), taskpool, TrainConfig(), preference=(0.3, 0.7))
    loss, _ = LinearScalarization().loss(model, batches, state)
    assert torch.equal(loss, 0.3 * losses["digits"] + 0.7 * losses["parity"])  # the same bits as by hand
