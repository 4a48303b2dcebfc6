"""Training: the one loop (`loop`) and the methods built on it (`methods`: one model, or a derived pool).

The loop's public names are re-exported here because `mergebench_core.training` was its module before the core had
rooms; plugins written then keep working."""

from mergebench_core.training.loop import (
    Batch,
    TrainConfig,
    TrainResult,
    TrainState,
    derive_seed,
    task_losses,
    train,
)

__all__ = ["Batch", "TrainConfig", "TrainResult", "TrainState", "derive_seed", "task_losses", "train"]
