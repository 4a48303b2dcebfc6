"""The training family's typed parameters (`TrainingParams`) and what a loss reads from its state: the cell's
preference (`TrainState.preference`, `task_weights()`) and the model pool."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mergebench_core import ConfigError, MergebenchError
from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.training.loop import TrainConfig, TrainState
from mergebench_core.training.methods import TrainingMethod
from mergebench_core.training.params import TrainingParams, UnknownTrainingField


@dataclasses.dataclass
class LossParams(TrainingParams):
    alpha: float = 0.5
    steps: int = 7  # a training field re-declared to change its default


def test_an_unknown_training_field_is_refused_with_the_closest_names():
    with pytest.raises(UnknownTrainingField, match=r"no field 'lrr'\. Did you mean 'lr'\?") as err:
        TrainingParams(lrr=1e-4)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, TypeError)
    assert "Its fields: steps, lr, batch_size" in str(err.value)
    with pytest.raises(UnknownTrainingField, match=r"LossParams .* no field 'warmup_step'\. Did you mean "
                                                   r"'warmup_steps'\?"):
        LossParams(warmup_step=10)
    with pytest.raises(UnknownTrainingField, match="'alpah'.*'alpha'"):
        dataclasses.replace(LossParams(), alpah=1.0)


def test_a_name_far_from_every_field_lists_them_without_a_guess():
    with pytest.raises(UnknownTrainingField) as err:
        TrainingParams(zzz=1)
    assert "Did you mean" not in str(err.value) and "grad_clip" in str(err.value)


def test_fields_reach_the_loop_and_bad_values_are_refused_when_built():
    config = LossParams(lr=1e-3, schedule="cosine").train_config()
    assert (config.steps, config.lr, config.schedule, config.batch_size) == (7, 1e-3, "cosine", 64)
    assert [f.name for f in dataclasses.fields(TrainingParams)] == [
        "steps", "lr", "batch_size", "optimizer", "weight_decay", "schedule", "warmup_steps", "grad_clip"]
    with pytest.raises(ValueError, match="lr must be a positive number"):
        LossParams(lr=-1.0)

    @dataclasses.dataclass
    class WithEval(TrainingParams):
        eval_every: int = 5  # a TrainConfig field the base leaves out reaches the loop when declared

    assert WithEval().train_config().eval_every == 5
    assert TrainingParams().train_config().eval_every == TrainConfig().eval_every == 0


def test_the_command_line_builds_them_and_refuses_typos():
    [params] = build_params("toy", LossParams, None, parse_overrides(["toy.lr=0.001", "toy.alpha=2"]))
    assert isinstance(params, LossParams) and (params.lr, params.alpha, params.steps) == (0.001, 2.0, 7)
    with pytest.raises(ConfigError, match="Did you mean 'lr'"):
        build_params("toy", LossParams, None, parse_overrides(["toy.lrr=0.001"]))


def test_a_training_method_without_params_of_its_own_takes_the_training_fields():
    class Plain(TrainingMethod):
        name = "plain"

        def loss(self, model, batches, state):
            raise AssertionError("not called")

    assert Plain.Params is TrainingParams and Plain().train_config() == TrainConfig()

    @dataclasses.dataclass
    class Old:  # parameters written before TrainingParams: still read by name
        lr: float = 1e-4
        steps: int = 3

    assert (Plain(Old()).train_config().lr, Plain(Old()).train_config().steps) == (1e-4, 3)


def _state(preference=None, extras=None, tasks=("a", "b", "c")):
    return TrainState(1, tasks, torch.device("cpu"), torch.Generator(), None, TrainConfig(), dict(extras or {}),
                      preference=preference)


def test_task_weights_are_the_preference_or_uniform():
    uniform = _state().task_weights()
    assert uniform.dtype == torch.float64 and uniform.tolist() == [1 / 3, 1 / 3, 1 / 3]
    weights = _state((0.1, 0.2, 0.7)).task_weights()
    assert weights.tolist() == [0.1, 0.2, 0.7]  # exactly the preference's floats
    assert _state((0.1, 0.2, 0.7)).task_weights(torch.float32).tolist() == torch.tensor([0.1, 0.2, 0.7]).tolist()
    assert _state(tasks=("a", "b")).task_weights().tolist() == [0.5, 0.5]


def test_the_preference_is_typed_and_the_older_extras_form_still_works():
    typed = _state((0.1, 0.2, 0.7))
    assert typed.preference == (0.1, 0.2, 0.7)
    assert typed.extras["preference"] == {"a": 0.1, "b": 0.2, "c": 0.7}  # for losses that read extras
    assert _state().extras["preference"] is None
    old = _state(extras={"preference": {"c": 0.7, "a": 0.1, "b": 0.2}, "modelpool": "pool"})
    assert old.preference == (0.1, 0.2, 0.7) and old.task_weights().tolist() == [0.1, 0.2, 0.7]
    assert old.modelpool == "pool"
    with pytest.raises(MergebenchError, match=r"no weight for task\(s\) \['c'\]"):
        _state(extras={"preference": {"a": 0.5, "b": 0.5}})
    with pytest.raises(MergebenchError, match="one finite, non-negative weight per task"):
        _state((0.5, 0.5))
    with pytest.raises(MergebenchError, match="one finite, non-negative weight per task"):
        _state((0.5, -0.5, 1.0))
