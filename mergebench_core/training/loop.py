"""The one training loop of the core: a training method writes its loss, not a loop.

Optimizer, learning-rate schedule, seeded data order, gradient clipping, periodic evaluation on "val" and metrics
logging live here once, so every training plugin gets them right, reproducibly, in the same way. A training method's
parameters subclass `training.params.TrainingParams`, whose `train_config()` builds the `TrainConfig`; `train` gets
that config and a `LossFn`, which reads the cell's preference from its `TrainState`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergebench_core.contract.api import Batch, ModelPool, TaskPool
from mergebench_core.data.batches import shuffled_batches
from mergebench_core.data.evaluation import evaluate
from mergebench_core.errors import MergebenchError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    """How to train: optimizer, schedule, batches, evaluation and logging. Every field has a default."""

    steps: int = 200
    lr: float = 3e-4
    optimizer: str = "adam"
    """adam | adamw | sgd."""
    weight_decay: float = 0.0
    momentum: float = 0.9
    """For sgd only."""
    schedule: str = "constant"
    """constant | cosine | linear: after the warmup, the learning rate decays to 0 (cosine, linear) or stays."""
    warmup_steps: int = 0
    """Steps of linear warmup, reaching `lr` at step `warmup_steps`."""
    grad_clip: float = 0.0
    """Largest global L2 norm of the gradients the optimizer sees; 0 turns clipping off."""
    batch_size: int = 64
    """Examples per task per step."""
    shuffle_buffer: int = 4096
    """Examples per task held for shuffling (the whole split when it is no larger); bounds memory."""
    eval_every: int = 0
    """Evaluate on "val" every N steps and after the last; 0 never does."""
    eval_examples: int = 512
    """Validation examples per task at each evaluation."""
    log_every: int = 1
    """Hand training metrics to the loggers every N steps; 0 never does."""

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (0 <= self.warmup_steps <= self.steps,
             f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.shuffle_buffer >= self.batch_size,
             f"shuffle_buffer must be >= batch_size={self.batch_size}, got {self.shuffle_buffer}"),
            (self.eval_every >= 0, f"eval_every must be >= 0 (0 never evaluates), got {self.eval_every}"),
            (self.eval_examples >= 1, f"eval_examples must be >= 1, got {self.eval_examples}"),
            (self.log_every >= 0, f"log_every must be >= 0 (0 never logs), got {self.log_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_params(cls, params: Any) -> TrainConfig:
        """The TrainConfig fields present on any dataclass instance; the rest keep defaults. This matches by name, so
        it cannot tell a misspelt field from a loss's own: parameters that subclass `TrainingParams` have
        `train_config()` instead. Kept for Params written before that."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name in names})

    def lr_at(self, step: int) -> float:
        """The learning rate step `step` (counted from 1) uses. Warmup climbs linearly to `lr` at `warmup_steps`;
        the decay then starts from `lr` at the next step and would reach 0 one step after the last, so no step is
        spent with a learning rate of 0 (as PyTorch's CosineAnnealingLR with T_max = the decay steps)."""
        if step <= self.warmup_steps:
            return self.lr * max(step, 0) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps - 1) / max(1, self.steps - self.warmup_steps))
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (1.0 - progress)


@dataclass
class TrainState:
    """What a loss function may read besides the model and the batches."""

    step: int
    """The current step, counted from 1."""
    tasks: tuple[str, ...]
    device: torch.device
    generator: torch.Generator
    """Seeded from the run's seed, on `device`: the source of any randomness the loss draws itself."""
    taskpool: TaskPool
    """For the tasks' heads: `taskpool.logits(model, task, inputs)`."""
    config: TrainConfig
    extras: dict[str, Any] = field(default_factory=dict)
    """Values the loss keeps across steps (a snapshot of θ₀, a reference point). For losses written before
    `preference` and `modelpool` existed, it also holds them: "preference" ({task: weight} or None), "modelpool"."""
    report: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable values the loss wants kept with the result (counters, last values): `TrainResult.report`,
    and the cell's extras for a training method."""
    preference: tuple[float, ...] | None = None
    """The cell's preference over `tasks`, in their order (non-negative, summing to 1); None when the cell has none.
    `task_weights()` gives it as a tensor, uniform when None."""
    modelpool: ModelPool | None = None
    """The pool being trained from (its experts, e.g. as a reference point of the loss)."""

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        given = self.extras.get("preference")
        if self.preference is None and given is not None:  # a caller of the older form: {task: weight} in extras
            missing = [t for t in self.tasks if t not in given]
            if missing:
                raise MergebenchError(f"the preference {dict(given)} has no weight for task(s) {missing}; give one "
                                      f"weight per task of {list(self.tasks)}")
            self.preference = tuple(given[t] for t in self.tasks)
        if self.preference is not None:
            self.preference = tuple(float(v) for v in self.preference)
            if len(self.preference) != len(self.tasks) or not all(math.isfinite(v) and v >= 0
                                                                   for v in self.preference):
                raise MergebenchError(f"the preference {list(self.preference)} must be one finite, non-negative "
                                      f"weight per task of {list(self.tasks)}")
        self.extras.setdefault("preference", dict(zip(self.tasks, self.preference))
                               if self.preference is not None else None)
        if self.modelpool is None:
            self.modelpool = self.extras.get("modelpool")
        self.extras.setdefault("modelpool", self.modelpool)

    def task_weights(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """The preference as a tensor over `tasks` (in their order), 1/m for each of m tasks when the cell has none.
        float64 by default: it holds the preference exactly as the cell gave it, so a loss that reads single weights
        (`.tolist()`) computes with the same numbers as from the preference itself."""
        m = len(self.tasks)
        values = self.preference if self.preference is not None else [1.0 / m] * m
        return torch.tensor(values, dtype=dtype, device=device)


LossOutput = Union[Tensor, tuple[Tensor, Mapping[str, float]]]
LossFn = Callable[[nn.Module, Mapping[str, Batch], TrainState], LossOutput]
"""(model, {task: (inputs, labels)} on the device, state) -> scalar loss, or (loss, extra metrics to log)."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    """The loss of the last step (nan when no step ran)."""
    seconds: float
    val_metrics: dict[str, float] | None = None
    """The last evaluation, keyed as logged (`acc/val/{task}`, `loss/val/{task}`); None without evaluation."""
    report: dict[str, Any] = field(default_factory=dict)
    """`TrainState.report` at the end of training."""


def task_losses(model: nn.Module, batches: Mapping[str, Batch], state: TrainState) -> dict[str, Tensor]:
    """Each task's mean loss through its head: cross-entropy, or squared error for float (regression) labels.
    The building block of multi-task objectives (linear, Chebyshev, EPO scalarisations)."""
    losses = {}
    for task, (inputs, labels) in batches.items():
        logits = state.taskpool.logits(model, task, inputs).float()
        if labels.is_floating_point():
            losses[task] = F.mse_loss(logits.reshape(labels.shape), labels.float())
        else:
            losses[task] = F.cross_entropy(logits, labels)
    return losses


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed for one named stream of a run, so streams (data order per task, the loss's generator, the
    global RNG) are independent of each other and of neighbouring seeds (seed + 1 never repeats another stream)."""
    digest = hashlib.blake2b(repr((int(seed), *labels)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=config.lr, weight_decay=config.weight_decay)


def _to(batch: Batch, device: torch.device) -> Batch:
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def _validate(taskpool: TaskPool, model: nn.Module, tasks: Sequence[str], config: TrainConfig,
              device: torch.device) -> dict[str, float]:
    """Metrics on each task's "val" split, keyed for the loggers; the model goes back to training mode after."""
    names = {"accuracy": "acc", "loss": "loss"}
    metrics = evaluate(taskpool, model, tasks=tasks, split="val", limit=config.eval_examples, device=device)
    model.train()
    return {f"{names.get(k, k)}/val/{task}": v for task, row in metrics.items() for k, v in row.items()
            if k != "examples"}


def train(model: nn.Module, taskpool: TaskPool, tasks: Sequence[str], loss_fn: LossFn, config: TrainConfig, *,
          seed: int, device: torch.device | str = "cpu", parameters: Iterable[nn.Parameter] | None = None,
          log_metrics: Callable[[int, Mapping[str, float]], None] | None = None,
          progress: Callable[..., Iterator[Any]] | None = None, extras: Mapping[str, Any] | None = None,
          preference: Sequence[float] | None = None, modelpool: ModelPool | None = None,
          split: str = "train") -> TrainResult:
    """Train `model` in place on `tasks` by minimising `loss_fn`, one batch of every task per step; the model ends
    in evaluation mode on `device`.

    Everything random follows from `seed`: the data order of task i, the generator in `TrainState`, and the global
    RNG (forked and restored, so dropout is reproducible and callers' RNG streams are left as they were).
    `preference` (one weight per task) and `modelpool` reach the loss as `TrainState.preference` and `.modelpool`.
    `split` is where the batches come from: "train" for supervised losses, "test" for test-time adaptation, whose
    losses (prediction entropy) never read the labels.
    """
    device = torch.device(device)
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in taskpool.tasks]
    if not tasks or unknown:
        raise MergebenchError(f"train needs tasks of task pool {taskpool.name!r}; got {list(tasks)}, "
                              f"unknown: {unknown}")
    model.to(device).train()
    params = [p for p in (model.parameters() if parameters is None else parameters) if p.requires_grad]
    if not params:
        raise MergebenchError("train got no parameters that require gradients")
    optimizer = _optimizer(config, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: config.lr_at(k + 1) / config.lr)
    streams = {t: shuffled_batches(taskpool, t, split, batch_size=config.batch_size, buffer=config.shuffle_buffer,
                                   generator=torch.Generator().manual_seed(derive_seed(seed, "data", i)))
               for i, t in enumerate(tasks)}
    state = TrainState(0, tasks, device, torch.Generator(device=device).manual_seed(derive_seed(seed, "loss")),
                       taskpool, config, dict(extras or {}), preference=preference, modelpool=modelpool)
    steps: Iterable[int] = range(1, config.steps + 1)
    if progress is not None:
        steps = progress(steps, desc="train", total=config.steps)
    loss_value, val, start = math.nan, None, time.perf_counter()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(derive_seed(seed, "global"))
            if cuda:
                with torch.cuda.device(cuda[0]):
                    torch.cuda.manual_seed(derive_seed(seed, "global"))
            for step in steps:
                state.step = step
                batches = {t: _to(next(streams[t]), device) for t in tasks}
                out = loss_fn(model, batches, state)
                loss, named = out if isinstance(out, tuple) else (out, {})
                if loss.dim() != 0:
                    raise MergebenchError(f"the loss function returned a tensor of shape {tuple(loss.shape)} "
                                          f"at step {step}; it must return a scalar")
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise MergebenchError(f"the training loss is {loss_value} at step {step} of {config.steps}; "
                                          f"lower the learning rate (lr={config.lr}) or set grad_clip")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                metrics = {"loss": loss_value, "lr": optimizer.param_groups[0]["lr"]}
                if config.grad_clip > 0:
                    norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
                    if not math.isfinite(norm):
                        raise MergebenchError(f"the gradient norm is {norm} at step {step}")
                    metrics["grad_norm"] = norm
                optimizer.step()
                scheduler.step()
                logged: dict[str, float] = {}
                if config.log_every and step % config.log_every == 0:
                    logged = {**metrics, **{k: float(v) for k, v in named.items()}}
                if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                    val = _validate(taskpool, model, tasks, config, device)
                    log.info("step %d: %s", step, val)
                    logged.update(val)
                if logged and log_metrics is not None:
                    log_metrics(step, logged)
            if config.eval_every and config.steps == 0:  # no step: score the untrained model, as step 0
                val = _validate(taskpool, model, tasks, config, device)
                if log_metrics is not None:
                    log_metrics(0, val)
    finally:
        model.eval()
    seconds = time.perf_counter() - start
    log.info("trained %d steps on %s in %.1f s, final loss %.4g", config.steps, ", ".join(tasks), seconds,
             loss_value)
    return TrainResult(config.steps, loss_value, seconds, val, dict(state.report))
