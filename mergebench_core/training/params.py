"""The parameters every training method shares, as one typed dataclass that refuses names it does not have.

Training plugins used to re-declare steps, lr, batch_size, ... in their own Params, and the loop picked the fields up by
name (`TrainConfig.from_params`): a misspelt field was silently a new parameter that nothing read. A plugin now
subclasses `TrainingParams`, adds only its loss's own fields (or re-declares a training field to change its default),
and gets the training fields, their checks and `train_config()` from here. Building one with a name it does not have
(`Params(lrr=1e-4)`, a mapping with a typo) fails at once, naming the field and the closest valid names.

The fields are exactly those the training plugins declared before, so stored cell keys and trained-model recipes (which
hash every parameter) stay the same. Other `TrainConfig` fields (`eval_every`, `log_every`, ...) reach the loop when a
subclass declares them.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from mergebench_core.errors import ConfigError
from mergebench_core.training.loop import TrainConfig


class UnknownTrainingField(ConfigError, TypeError):
    """A training method's parameters were given a field they do not have (a TypeError too, as Python raises for any
    unexpected keyword argument)."""


def unknown_field(params_cls: type, name: str) -> UnknownTrainingField:
    """The error for field `name`, which `params_cls` does not have: the closest valid names, then all of them."""
    valid = [f.name for f in dataclasses.fields(params_cls)]
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownTrainingField(f"{params_cls.__qualname__} (training parameters) has no field {name!r}.{hint} "
                                f"Its fields: {', '.join(valid)}")


@dataclass
class TrainingParams:
    """How a training method trains: the core loop's optimizer, schedule and batch fields, with their defaults.

    Subclass it (as a dataclass) for a method's own parameters; `method.lr=1e-4` on the command line sets a field.
    """

    steps: int = 200
    lr: float = 3e-4
    batch_size: int = 64
    """Examples per task per step."""
    optimizer: str = "adam"
    """adam | adamw | sgd."""
    weight_decay: float = 0.0
    schedule: str = "constant"
    """constant | cosine | linear (after `warmup_steps` of linear warmup)."""
    warmup_steps: int = 0
    grad_clip: float = 0.0
    """Largest global L2 norm of the gradients; 0 turns clipping off."""

    def __new__(cls, *args: Any, **kwargs: Any) -> TrainingParams:
        # The generated __init__ would refuse an unknown keyword too, but without saying which names exist.
        known = {f.name for f in dataclasses.fields(cls)}
        for name in kwargs:
            if name not in known:
                raise unknown_field(cls, name)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        self.train_config()  # a bad value is refused when the parameters are built, not after the first expert

    def train_config(self) -> TrainConfig:
        """The loop's configuration: every `TrainConfig` field this instance has; the others keep their defaults."""
        mine = {f.name for f in dataclasses.fields(self)}
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig) if f.name in mine})
