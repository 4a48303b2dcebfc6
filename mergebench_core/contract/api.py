"""The three nouns of mergebench (ModelPool, TaskPool, Method) and the small values they exchange.

Model pools hold weights only; task pools hold data, heads and metrics. Keeping data with the task (and not with
the model pool) lets one model pool be scored by several task pools, and gives data-dependent methods one place
to ask for a task's training examples and logits.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

from mergebench_core.errors import MergebenchError

if TYPE_CHECKING:
    from mergebench_core.contract.permutations import PermutationSpec
    from mergebench_core.running.loggers import LoggerSet

PRETRAINED = "_pretrained_"
"""The name of the pretrained model in every pool (FusionBench's convention)."""

Batch = tuple[torch.Tensor, torch.Tensor]
"""(inputs, integer labels) as a task pool hands them out."""

MethodKind = Literal["merge", "ensemble", "fusion", "training", "upscale"]
""""upscale": the method returns an *upscaled model*, the pretrained model with some modules replaced by routed
mixtures of experts or adapters (`mergebench_core.upscaling`); the harness stores its parameter count against the
base's (`params ×`), and no checkpoint of the base architecture can hold it."""
DataNeed = Literal["none", "unlabeled", "labeled"]
PoolRelation = Literal["finetuned", "independent"]
Split = Literal["train", "val", "test"]
"""Task-pool splits. "val" is a deterministic 10 % of "train" (seed 0, as FusionBench carves it), for methods that
tune on held-out data; "train" stays whole, so statistics computed on it do not change when "val" is used."""


@dataclass(frozen=True)
class MethodInfo:
    """What the harness needs to know about a method before running it."""

    kind: MethodKind = "merge"
    data: DataNeed = "none"
    stochastic: bool = False
    task_specific: bool = False
    """True when the method yields one model per task (EMR-Merging); tables mark such rows apart."""
    preference_aware: bool = False
    """True when the method reads `RunContext.preference`: it then runs once per preference vector of the grid.
    Other methods run once per pool, whatever preferences the grid names."""
    task_vectors: bool = False
    """True when the method works on task vectors θ_t − θ_0: it needs a pretrained model that every expert was
    fine-tuned from, so it refuses pools of independently trained models. (Data-free `TensorMergeMethod`s declare
    this through `requires_base` instead.)"""
    left_out_of_sweeps: str = ""
    """Why a sweep over every method leaves this one out (say, it trains for minutes where the rest take seconds);
    empty for methods that every sweep runs. A method left out still runs when named with `--method`."""


@dataclass(frozen=True)
class MetricSpec:
    """A metric a task pool reports for a task. The first one a task declares is its primary metric: the one averaged
    in tables, normalised against the experts, and used as an objective on Pareto fronts.

    `compute(logits, labels)` gets every test example of the task at once (concatenated batches); None means the
    evaluation loop's own streamed accuracy.
    """

    name: str
    higher_is_better: bool = True
    compute: Callable[[torch.Tensor, torch.Tensor], float] | None = None


ACCURACY = MetricSpec("accuracy")


class ModelPool(ABC):
    """A pretrained model and the experts fine-tuned from it, loaded lazily, one at a time.

    `load_model` returns the *mergeable* module only (a CLIP vision tower, an encoder without its heads); the heads
    that turn its output into predictions belong to the task pool.
    """

    name: str = ""
    default_taskpool: str | None = None
    has_pretrained: bool = True
    relation: PoolRelation = "finetuned"
    """"finetuned": experts fine-tuned from one pretrained model (task vectors exist). "independent": models trained
    from different random initialisations, with no pretrained model; they must be aligned before they are fused."""
    files_only: ClassVar[bool] = False
    """True for checkpoint files given to `mergebench merge`: tensors only, no modules to load and no task pool, so
    only methods that declare `Method.merges_files` can run on them."""
    how_to_add_pretrained: str = "choose a pool that names the pretrained model the experts were fine-tuned from"
    """What a task-vector method's refusal tells the user when the pool has no pretrained model."""

    @property
    @abstractmethod
    def expert_names(self) -> list[str]:
        """Names of the expert models, in a stable order."""

    @abstractmethod
    def load_model(self, name: str) -> nn.Module:
        """A fresh copy of model `name` (an expert name or PRETRAINED) on the CPU, in evaluation mode."""

    def task_of(self, expert: str) -> str:
        """The task an expert was fine-tuned on (by default the expert's own name)."""
        return expert

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The weights of model `name`; pools backed by files may override this to read lazily."""
        return self.load_model(name).state_dict()

    def identity(self, name: str) -> str:
        """A string that changes whenever the weights of `name` change; keys for cached statistics."""
        return f"{self.name}/{name}"

    def version_info(self) -> dict[str, str]:
        """Extra provenance stored with every result (recipe hashes, hub revisions)."""
        return {}

    def permutation_spec(self) -> PermutationSpec | None:
        """Which axes of which tensors share a permutation of hidden units (for aligning independent models), or
        None when the architecture declares none. See `mergebench_core.fusion.alignment`."""
        return None

    def configure(self, *, dtype: str | None = None, trust_pickle: bool = False) -> None:
        """Run-wide options from the command line (`--dtype`, `--trust-pickle`); pools that have no use for them
        ignore them. Called once, right after the pool is built."""

    def missing_resources(self) -> list[str]:
        """Resources this pool needs that are not on this machine and cannot be fetched now (offline), one line each.
        The runner checks every selected pool before any work starts and reports them all at once."""
        return []

    def download(self, progress: Callable[[str], None] | None = None) -> None:
        """Fetch everything the pool needs into local caches (`mergebench download`); `progress` gets a line per
        item."""


class TaskPool(ABC):
    """Tasks on which a model is scored: their data, their heads and their metrics.

    Implement `batches` and `logits`; the shared evaluation loop in `mergebench_core.data.evaluation` does the rest
    (inference mode, devices, ensembles and per-task models, accuracy and loss).
    """

    name: str = ""

    @property
    @abstractmethod
    def tasks(self) -> list[str]:
        """Task names, in a stable order."""

    @abstractmethod
    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterable[Batch]:
        """Labeled batches of `task`'s `split` ("train", "val" or "test", see `Split`); `limit` keeps the first N
        examples. `mergebench_core.data.splits.validation_indices` carves "val" the same way for every pool."""

    @abstractmethod
    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        """Class logits of `model` (a mergeable module) for `task`, through the task's head."""

    def num_examples(self, task: str, split: str = "test") -> int | None:
        """How many examples the split holds, for progress bars; None when unknown."""
        return None

    def metrics(self, task: str) -> Sequence[MetricSpec]:
        """The metrics reported for `task`, primary first (accuracy unless a pool says otherwise: Matthews
        correlation for CoLA, Spearman for STS-B)."""
        return (ACCURACY,)

    def version_info(self) -> dict[str, str]:
        return {}

    def missing_resources(self) -> list[str]:
        """As `ModelPool.missing_resources`: what scoring needs (base model, datasets) that is absent and
        unfetchable."""
        return []

    def configure(self, *, dtype: str | None = None, trust_pickle: bool = False) -> None:
        """As `ModelPool.configure` (a task pool whose heads come from pickle files needs `trust_pickle`)."""

    def download(self, progress: Callable[[str], None] | None = None) -> None:
        """Fetch the task pool's data and models into local caches (`mergebench download`)."""


@dataclass
class Ensemble:
    """Several models whose logits are averaged (with weights) at evaluation time."""

    models: Sequence[nn.Module]
    weights: Sequence[float] | None = None


@dataclass
class PerTaskModels:
    """One model per task (EMR-Merging and friends): each task is scored with its own modulated model."""

    models: Mapping[str, nn.Module]


Evaluable = nn.Module | Ensemble | PerTaskModels


@dataclass
class MergeOutput:
    """What a method returns: the thing to evaluate, and anything worth keeping about how it was made."""

    model: Evaluable
    extras: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable details stored with the result (learned coefficients, thresholds, ...)."""


T = TypeVar("T")


@dataclass
class RunContext:
    """Everything a method may use besides its parameters and the pool."""

    taskpool: TaskPool | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    preference: tuple[float, ...] | None = None
    """For preference-aware methods: a preference vector over `tasks` (non-negative, summing to 1)."""
    tasks: tuple[str, ...] = ()
    """The tasks of this cell, in the task pool's order (a `--tasks` selection restricts them)."""
    eval_only: bool = False
    """Training methods must not train: load the cached model or fail (`--eval-only`)."""
    metrics_logger: Callable[[int, Mapping[str, float]], None] | None = None
    """Receives per-step metrics (training curves); `log_metrics` is the way to call it."""
    loggers: LoggerSet | None = None
    """The run's loggers, for methods that train several models and log each apart (derived pools)."""
    method_version: str = ""
    """`distribution==version` of the plugin that provides the method: part of every trained model's cache key."""
    cache_dir: Path = field(default_factory=lambda: Path(".mergebench-cache"))
    bn_stats: str = "mean"
    """How a merge settles batch-norm running statistics: "base", "mean" or "recompute" (`--bn-stats`; see
    `mergebench_core.engine.running_stats`). The engine applies it; methods never merge running statistics
    themselves."""
    progress: Callable[..., Iterator[Any]] | None = None
    task_order: tuple[str, ...] = ()
    """For continual methods (`contract.continual`): the experts in the order they arrive; empty means the pool's."""
    on_step: Callable[[int, Sequence[str], Any], None] | None = None
    """For continual methods: called after each arrival with (step, the experts merged so far, the model), so the
    runner can score the tasks seen so far."""
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("mergebench"))

    def generator(self, device: torch.device | str = "cpu", offset: int = 0) -> torch.Generator:
        """A fresh generator seeded from the run's seed; every random choice of a method takes one."""
        return torch.Generator(device=device).manual_seed(self.seed + offset)

    def task_weights(self) -> dict[str, float]:
        """The preference as {task: weight}; uniform over `tasks` when the cell has no preference."""
        if self.preference is None:
            return {t: 1.0 / len(self.tasks) for t in self.tasks} if self.tasks else {}
        return dict(zip(self.tasks, self.preference))

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Hand per-step metrics to the run's loggers (JSON lines beside the store, W&B, ...)."""
        if self.metrics_logger is not None:
            self.metrics_logger(step, metrics)

    def track(self, iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterator[T]:
        """Wrap long loops so the user sees progress; a no-op when no progress reporter is set."""
        if self.progress is None:
            return iter(iterable)
        return self.progress(iterable, desc=desc, total=total)


class Method(ABC):
    """A way to turn a model pool into a model.

    Subclasses set `name`, a `Params` dataclass whose fields all have defaults, and `info`, then implement `run`.
    Data-free methods that work tensor by tensor should subclass `mergebench_core.TensorMergeMethod` instead: they
    then also run on checkpoint files (`mergebench merge`) and stream over tensors.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    info: ClassVar[MethodInfo] = MethodInfo()
    merges_files: ClassVar[bool] = False
    """True when the method merges tensor by tensor from the weights alone, so it also runs on checkpoint files
    (`mergebench merge`); `TensorMergeMethod` sets it."""

    def __init__(self, params: Any | None = None):
        self.params = params if params is not None else self.Params()

    @abstractmethod
    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        """Merge (or fuse, or train) the pool into something the task pool can evaluate."""

    @classmethod
    def needs_task_vectors(cls) -> bool:
        """Whether the method needs experts fine-tuned from one pretrained model (see `MethodInfo.task_vectors`)."""
        return cls.info.task_vectors

    @classmethod
    def refusal(cls, pool: ModelPool, params: Any) -> str | None:
        """Why this method cannot run on `pool` with `params`, phrased as what to change; None when it can.

        The one question the harness asks before running a method: `mergebench run` leaves a refused cell out of a
        sweep over every method (listing it under "not run") and refuses it, before any work, when the user names
        the method; `mergebench merge` asks it of the checkpoint files. Overrides return
        `super().refusal(pool, params)` when they find nothing wrong themselves, so that the checks of the bases
        (task vectors, fusion, files) still apply.

        The default also asks the two older questions, `unsuitable_for` and `cannot_run_on`, so that plugins
        written before this one still refuse what they refused.
        """
        token = _ASKING_OLDER.set(True)
        try:
            return cls.unsuitable_for(pool, params)
        finally:
            _ASKING_OLDER.reset(token)

    def require_fit(self, pool: ModelPool) -> None:
        """Raise `refusal`'s answer for this method's parameters as an error naming the method and the pool.

        The runner asks `refusal` before any work; `run` bodies call this too, because the Python API reaches them
        without the runner."""
        reason = self.refusal(pool, self.params)
        if reason:
            raise MergebenchError(f"{self.name} cannot run on pool {pool.name!r}: {reason}")

    # The two older questions work both ways round: a plugin that overrides them is heard by `refusal` (which asks
    # them, flagged by _ASKING_OLDER, down to the base checks), and code that still calls them gets `refusal`'s
    # whole answer, overrides in newer subclasses included.

    @classmethod
    def unsuitable_for(cls, pool: ModelPool, params: Any) -> str | None:
        """Older name for `refusal`, kept for plugins that override or call it."""
        if _ASKING_OLDER.get():
            return cls.cannot_run_on(pool)
        return cls.refusal(pool, params)

    @classmethod
    def cannot_run_on(cls, pool: ModelPool) -> str | None:
        """Older name for `refusal` with the default parameters, kept for plugins that override or call it."""
        if _ASKING_OLDER.get():
            return task_vector_refusal(cls, pool) or file_refusal(cls, pool)
        return cls.refusal(pool, cls.Params())


_ASKING_OLDER: ContextVar[bool] = ContextVar("mergebench_asking_older_refusals", default=False)
"""Set while `Method.refusal` asks a method's older questions, so that their defaults end at the base checks
instead of asking `refusal` again."""


def task_vector_refusal(method: type[Method], pool: ModelPool) -> str | None:
    """A task-vector method on a pool with no shared pretrained model: there is no θ_0 to subtract."""
    if not method.needs_task_vectors():
        return None
    if pool.relation == "independent":
        return (f"it works on task vectors θ_t − θ_0, and pool {pool.name!r} holds independently trained models "
                f"with no shared pretrained model; align and fuse them instead (a fusion method such as "
                f"git_rebasin)")
    if not pool.has_pretrained:
        return (f"it works on task vectors θ_t − θ_0, and pool {pool.name!r} has no pretrained model; "
                f"{pool.how_to_add_pretrained}")
    return None


def file_refusal(method: type[Method], pool: ModelPool) -> str | None:
    """Checkpoint files (`ModelPool.files_only`) hold tensors and nothing else: no modules, no data, no task pool.
    Data-free tensor-by-tensor methods declare `merges_files = True`; every other kind is refused with its reason."""
    if method.merges_files or not getattr(pool, "files_only", False):  # getattr: duck-typed pools of older tests
        return None
    info, name = method.info, method.name
    elsewhere = f"use `mergebench run --method {name} --modelpool ...`"
    if info.kind == "ensemble":
        return (f"method {name!r} is an output ensemble: it keeps every expert and averages their predictions when "
                f"they are scored, so there is no merged checkpoint to write. Score it with "
                f"`mergebench run --method {name} --modelpool ...`")
    if info.data != "none":
        return (f"method {name!r} needs {info.data} data from a task pool, which checkpoint files do not carry; "
                f"{elsewhere}")
    if info.kind == "training":
        return f"method {name!r} trains models rather than merging them; {elsewhere}"
    if info.kind == "upscale":
        return (f"method {name!r} returns an upscaled model (modules of the base replaced by routed experts, with "
                f"more parameters than the base), which no checkpoint of the base architecture can hold; {elsewhere}")
    return f"method {name!r} works on a whole model pool, not tensor by tensor, so it cannot merge files; {elsewhere}"


@dataclass(frozen=True)
class Registration:
    """A named thing a plugin provides, with where it came from (filled in by the registry)."""

    name: str
    obj: Any
    kind: Literal["method", "modelpool", "taskpool", "logger", "command"]
    description: str = ""
    plugin: str = ""
    distribution: str = ""
    version: str = ""
    default: bool = False
    """For model pools: run by `mergebench run` when no pool is named."""
    params: type | None = None
    """For model pools: the dataclass of the pool's parameters (`register(..., params=Params)`), whose defaults give
    the pool as registered; the factory is then called with an instance (`factory(params)`), else with nothing.
    See `mergebench_core.pools.params`."""
