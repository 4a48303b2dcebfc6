"""Training methods and what they produce: one model, or a derived pool of re-trained experts.

A training plugin subclasses `TrainingMethod` and writes its loss; the core's loop (`training.train`) does the rest.
Every trained model is cached as safetensors under a hash of its recipe: the pretrained model's identity and the
pools' versions, the method, its parameters and code version, the tasks, the preference and the seed. Re-scoring a
front or re-running a grid therefore never retrains, and `--eval-only` refuses to train at all.

A method with `produces = "pool"` re-trains each expert of a pool from its pretrained model on that expert's task
alone. The result, `DerivedModelPool`, is an ordinary model pool named `<pool>+<method>` (with its non-default
parameters in parentheses), so every merge method runs on it unchanged. Its experts are the same cached models a
single-task run of the method would train, each built the first time something reads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mergebench_core.cache import ContentCache, Entry, Key, key_digest
from mergebench_core.contract.api import (
    PRETRAINED,
    MergeOutput,
    Method,
    MethodInfo,
    ModelPool,
    PerTaskModels,
    RunContext,
    TaskPool,
)
from mergebench_core.contract.config import params_dict
from mergebench_core.engine.safetensors_reader import SafetensorsSource, load_state_dict
from mergebench_core.engine.sources import StateDictSource, TensorSource
from mergebench_core.errors import MergebenchError
from mergebench_core.running.data_needs import require_task_pool
from mergebench_core.running.loggers import LoggerSet
from mergebench_core.training.loop import Batch, TrainConfig, TrainState, train
from mergebench_core.training.params import TrainingParams

log = logging.getLogger(__name__)

TRAINING_VERSION = 1
"""Bump when the core's loop changes the numbers it produces; every cached trained model is then retrained."""


class MissingTrainedModel(MergebenchError):
    """`--eval-only` asked for a model that was never trained with this recipe."""


class TrainingMethod(Method):
    """A method that trains from the pool's pretrained model. Subclasses set `name` and implement `loss`; `Params` is
    `TrainingParams` or a subclass adding the loss's own fields. (A Params that is not a `TrainingParams` still works:
    its fields named as `TrainConfig`'s are read by name.)"""

    Params: ClassVar[type] = TrainingParams
    info: ClassVar[MethodInfo] = MethodInfo(kind="training", data="labeled", task_vectors=True)
    produces: ClassVar[Literal["model", "pool"]] = "model"
    code_version: ClassVar[str] = "1"
    """Bump when the plugin's loss changes its numbers without a parameter showing it."""

    @abstractmethod
    def loss(self, model: nn.Module, batches: Mapping[str, Batch], state: TrainState
             ) -> torch.Tensor | tuple[torch.Tensor, Mapping[str, float]]:
        """The scalar to minimise for one step, from one batch per task (`state.taskpool` scores them)."""

    def train_config(self) -> TrainConfig:
        if isinstance(self.params, TrainingParams):
            return self.params.train_config()
        return TrainConfig.from_params(self.params)

    def trainable(self, model: nn.Module) -> list[nn.Parameter] | None:
        """The parameters to optimise; None trains every parameter of the model."""
        return None

    def seed_for(self, ctx_seed: int, tasks: Sequence[str]) -> int:
        """Single-task runs (a derived pool's experts) get a seed that depends on the task, not on which other
        experts were built with it, so a `[task]` selection and the whole pool share their cached experts."""
        if len(tasks) == 1:
            return (ctx_seed * 1_000_003 + zlib.crc32(tasks[0].encode())) % (2**31)
        return ctx_seed

    def recipe(self, pool: ModelPool, taskpool: TaskPool, tasks: Sequence[str], *, seed: int,
               preference: Sequence[float] | None, code_version: str) -> dict[str, Any]:
        """Everything that determines the trained weights, and nothing else."""
        return {
            "method": self.name, "params": params_dict(self.params),
            "code": [code_version, self.code_version, TRAINING_VERSION],
            "pretrained": pool.identity(PRETRAINED), "modelpool_versions": pool.version_info(),
            "taskpool_versions": taskpool.version_info(), "tasks": list(tasks),
            "preference": list(preference) if preference is not None else None, "seed": seed,
        }

    def obtain(self, pool: ModelPool, taskpool: TaskPool, tasks: Sequence[str], *, seed: int,
               preference: Sequence[float] | None, cache: TrainedModelCache, code_version: str,
               device: torch.device, eval_only: bool = False,
               log_metrics: Callable[[int, Mapping[str, float]], None] | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
        """The trained model of this recipe: from the cache, or trained now and cached."""
        seed = self.seed_for(seed, tasks)
        recipe = self.recipe(pool, taskpool, tasks, seed=seed, preference=preference, code_version=code_version)
        model = pool.load_model(PRETRAINED)
        cached = cache.load(recipe)
        info: dict[str, Any] = {"recipe": cache.digest(recipe)}
        if cached is not None:
            model.load_state_dict(cached)
            return model.eval(), info | {"trained_now": False}
        if eval_only:
            raise MissingTrainedModel(
                f"--eval-only: {self.name} on {pool.name} ({', '.join(tasks)}, seed {seed}"
                + (f", preference {list(preference)}" if preference is not None else "")
                + f") was never trained with these parameters (no {cache.path(recipe)}); run without --eval-only "
                f"to train it")
        with cache.lock(cache.path(recipe), f"{self.name} on {pool.name} ({', '.join(tasks)})"):
            cached = cache.load(recipe)  # another process may have trained it while this one waited
            if cached is not None:
                model.load_state_dict(cached)
                return model.eval(), info | {"trained_now": False}
            result = train(model, taskpool, list(tasks), self.loss, self.train_config(), seed=seed, device=device,
                           parameters=self.trainable(model), log_metrics=log_metrics, preference=preference,
                           modelpool=pool)
            cache.save(recipe, model.state_dict())
        return model.eval(), info | {"trained_now": True, "train": dataclasses.asdict(result)}

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        taskpool = require_task_pool(self, ctx.taskpool)  # the runner's guarantee; here for callers of the Python API
        cache = TrainedModelCache(Path(ctx.cache_dir) / "trained")
        if self.produces == "pool":
            derived = DerivedModelPool(pool, taskpool, self, name=f"{pool.name}+{self.name}", cache=cache,
                                       code_version=ctx.method_version, device=ctx.device, seed=ctx.seed,
                                       eval_only=ctx.eval_only, loggers=ctx.loggers)
            models = {pool.task_of(e): derived.load_model(e) for e in derived.expert_names}
            return MergeOutput(PerTaskModels(models), extras={"experts": derived.built})
        model, info = self.obtain(pool, taskpool, list(ctx.tasks) or taskpool.tasks, seed=ctx.seed,
                                  preference=ctx.preference, cache=cache, code_version=ctx.method_version,
                                  device=ctx.device, eval_only=ctx.eval_only, log_metrics=ctx.log_metrics)
        return MergeOutput(model, extras=info)

    def is_cached(self, pool: ModelPool, taskpool: TaskPool, tasks: Sequence[str], *, seed: int,
                  preference: Sequence[float] | None, cache: TrainedModelCache, code_version: str) -> bool:
        """Whether `run` would find every model it needs in the cache (a pool-deriving method: every expert)."""
        if self.produces == "pool":
            return all(self._model_cached(pool, taskpool, [pool.task_of(e)], seed, None, cache, code_version)
                       for e in pool.expert_names)
        return self._model_cached(pool, taskpool, tasks, seed, preference, cache, code_version)

    def _model_cached(self, pool: ModelPool, taskpool: TaskPool, tasks: Sequence[str], seed: int,
                      preference: Sequence[float] | None, cache: TrainedModelCache, code_version: str) -> bool:
        recipe = self.recipe(pool, taskpool, tasks, seed=self.seed_for(seed, tasks), preference=preference,
                             code_version=code_version)
        return cache.holds(recipe)

    @classmethod
    def refusal(cls, pool: ModelPool, params: Any) -> str | None:
        if not pool.has_pretrained:
            return f"it trains from a pretrained model, and pool {pool.name!r} has none"
        return super().refusal(pool, params)


class TrainedModelCache(ContentCache):
    """Trained state dicts in the content-addressed cache (`mergebench_core.cache`), one entry per recipe, named
    `<method>/<hash of the recipe>.safetensors`. The recipe is stored in the entry and the data has a digest: a file
    of another recipe (a collision, a hand-copied file) or with damaged bytes is never used, but retrained."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.trainings = 0

    @staticmethod
    def recipe_key(recipe: Mapping[str, Any]) -> dict[str, Any]:
        """The recipe as plain JSON (a value JSON cannot hold is keyed by its str), the cache key of its model."""
        return dict(json.loads(json.dumps(recipe, sort_keys=True, default=str)))

    @staticmethod
    def digest(recipe: Mapping[str, Any]) -> str:
        """The recipe's hash: its model's file name, and the identity of a derived pool's expert."""
        return key_digest(TrainedModelCache.recipe_key(recipe))

    def entry_name(self, key: Key, digest: str) -> str:
        return f"{key['method']}/{digest}"

    def path(self, recipe: Mapping[str, Any]) -> Path:
        return self.entry_path(self.recipe_key(recipe))

    def holds(self, recipe: Mapping[str, Any]) -> bool:
        """Whether `load(recipe)` would return a model: a file that exists but is of another recipe, of an older
        format or damaged is not a trained model (it would be refused on loading), so it is not one here either."""
        return self.is_valid(self.recipe_key(recipe), _describe(recipe))

    def load(self, recipe: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        """The trained state dict of `recipe`, or None when it was never trained or its file cannot be trusted."""
        entry = self.get(self.recipe_key(recipe), _describe(recipe))
        return entry.tensors if entry is not None else None

    def save(self, recipe: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> Path:
        self.trainings += 1
        return self.put(self.recipe_key(recipe), Entry(dict(state_dict)), _describe(recipe))


def _describe(recipe: Mapping[str, Any]) -> str:
    return f"trained model of {recipe['method']} (recipe {TrainedModelCache.digest(recipe)})"


class DerivedModelPool(ModelPool):
    """A pool's experts re-trained by a training method, each from the pool's pretrained model on its own task.

    The pretrained model is the base pool's; each expert is trained (and cached) the first time it is read.
    """

    def __init__(self, base: ModelPool, taskpool: TaskPool, method: TrainingMethod, *, name: str,
                 cache: TrainedModelCache, code_version: str, device: torch.device, seed: int = 0,
                 eval_only: bool = False, loggers: LoggerSet | None = None):
        if method.produces != "pool":
            raise MergebenchError(f"method {method.name!r} trains one model, not a pool of experts; derived pools "
                                  f"come from training methods that re-train every expert")
        self.base, self.taskpool, self.method, self.name = base, taskpool, method, name
        self.cache, self.code_version, self.device, self.seed = cache, code_version, device, seed
        self.eval_only, self.loggers = eval_only, loggers
        self.default_taskpool = base.default_taskpool
        self.built: dict[str, dict[str, Any]] = {}

    @property
    def expert_names(self) -> list[str]:
        return list(self.base.expert_names)

    def task_of(self, expert: str) -> str:
        return self.base.task_of(expert)

    def _check(self, name: str) -> None:
        if name != PRETRAINED and name not in self.base.expert_names:
            raise KeyError(f"pool {self.name!r} has no model {name!r}; models: {PRETRAINED}, "
                           f"{', '.join(self.base.expert_names)}")

    def _recipe(self, expert: str) -> dict[str, Any]:
        tasks = [self.task_of(expert)]
        return self.method.recipe(self.base, self.taskpool, tasks, seed=self.method.seed_for(self.seed, tasks),
                                  preference=None, code_version=self.code_version)

    def is_built(self, expert: str) -> bool:
        """Whether `expert` is trained and its cached file can be used (`TrainedModelCache.holds`)."""
        return self.cache.holds(self._recipe(expert))

    def _file(self, expert: str) -> Path:
        path = self.cache.path(self._recipe(expert))
        if expert not in self.built or not path.is_file():
            logger = self.loggers.open(f"derived/{self.name}/{expert}", {"pool": self.name, "expert": expert}) \
                if self.loggers is not None else None
            try:
                _, info = self.method.obtain(self.base, self.taskpool, [self.task_of(expert)], seed=self.seed,
                                             preference=None, cache=self.cache, code_version=self.code_version,
                                             device=self.device, eval_only=self.eval_only, log_metrics=logger)
            finally:
                if logger is not None:
                    logger.close()
            self.built[expert] = {k: v for k, v in info.items() if k != "train"}
        return path

    def load_model(self, name: str) -> nn.Module:
        self._check(name)
        model = self.base.load_model(PRETRAINED)
        if name != PRETRAINED:
            model.load_state_dict(load_state_dict(self._file(name)))
        return model.eval()

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        self._check(name)
        return self.base.state_dict(PRETRAINED) if name == PRETRAINED else load_state_dict(self._file(name))

    def tensor_source(self, name: str) -> TensorSource:
        self._check(name)
        if name == PRETRAINED:
            base_source = getattr(self.base, "tensor_source", None)
            return base_source(PRETRAINED) if base_source else StateDictSource(self.base.state_dict(PRETRAINED))
        return SafetensorsSource(self._file(name), name=f"{self.name}/{name}")

    def identity(self, name: str) -> str:
        if name == PRETRAINED:
            return self.base.identity(PRETRAINED)
        return f"{self.name}/{self.cache.digest(self._recipe(name))}"

    def version_info(self) -> dict[str, str]:
        recipe = {k: v for k, v in self._recipe(self.base.expert_names[0]).items() if k not in ("tasks", "seed")}
        return {**self.base.version_info(), "derived_recipe": self.cache.digest(recipe)}

    def permutation_spec(self) -> Any:
        return self.base.permutation_spec()

    def missing_resources(self) -> list[str]:
        return self.base.missing_resources()
