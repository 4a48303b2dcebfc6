"""finetune's loss is each task's cross-entropy through the task pool's frozen head."""

import torch
import torch.nn.functional as F

from mergebench_core import PRETRAINED
from mergebench_core.training.loop import TrainConfig, TrainState
from mergebench_core.training.params import TrainingParams
from mergebench_finetune import Finetune


def test_loss_is_the_cross_entropy_through_the_task_head(digits_pools):
    pool, taskpool = digits_pools
    model = pool.load_model(PRETRAINED)
    x, y = next(iter(taskpool.batches("rot90", "train", batch_size=32)))
    state = TrainState(1, ("rot90",), torch.device("cpu"), torch.Generator(), taskpool, TrainConfig())
    loss = Finetune().loss(model, {"rot90": (x, y)}, state)
    assert torch.allclose(loss, F.cross_entropy(taskpool.logits(model, "rot90", x), y))


def test_params_reach_the_training_loop():
    config = Finetune(TrainingParams(steps=7, lr=1e-3, schedule="cosine")).train_config()
    assert (config.steps, config.lr, config.schedule, config.batch_size) == (7, 1e-3, "cosine", 64)


def test_its_parameters_are_the_training_fields_and_nothing_else():
    assert Finetune.Params is TrainingParams
