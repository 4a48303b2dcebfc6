"""What every text task pool shares: resources, the tokenizer, tokenized splits, batches and the "val" split."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from mergebench_core import TaskPool
from mergebench_core.contract.api import ACCURACY, MetricSpec
from mergebench_core.data.splits import validation_indices
from mergebench_core.paths import cache_dir
from mergebench_core.pools import hub

from .catalog import Suite, TextTask, suite
from .tokens import TokenizedSplit, cache_key

log = logging.getLogger(__name__)

DATA_DIR_ENV = "MERGEBENCH_TEXT_DATA_DIR"
"""`$MERGEBENCH_TEXT_DATA_DIR/<dataset id>[/<config>]/<split>`: local `save_to_disk` copies used before the hub's."""


class TextTaskPool(TaskPool):
    """The tasks of one text suite. Subclasses say how an example becomes text (`encode_texts`) and how a model
    turns inputs into logits (`logits`).

    `max_length` (truncation) and `batch_size` (the largest batch handed out; callers asking for more get batches
    of this size) default to the suite's values, FusionBench's where it has them.
    """

    def __init__(self, suite_name: str, *, tasks: Sequence[str] | None = None, max_length: int | None = None,
                 batch_size: int | None = None, cache_root: Path | None = None):
        self.suite: Suite = suite(suite_name)
        self.name = suite_name
        self._tasks = list(tasks) if tasks is not None else self.suite.task_names
        unknown = [t for t in self._tasks if t not in self.suite.tasks]
        if unknown:
            raise KeyError(f"suite {suite_name!r} has no tasks {unknown}; tasks: {', '.join(self.suite.task_names)}")
        self.specs: dict[str, TextTask] = {t: self.suite.tasks[t] for t in self._tasks}
        self.max_length = int(max_length or self.suite.max_length)
        self.batch_size = int(batch_size or self.suite.batch_size)
        self._cache_root = cache_root
        self._splits: dict[tuple[str, str], TokenizedSplit] = {}
        self._on_device: dict[tuple[Any, ...], Any] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def cache_root(self) -> Path:
        return self._cache_root or cache_dir() / "text"

    def metrics(self, task: str) -> Sequence[MetricSpec]:
        from mergebench_core.data.metrics import MATTHEWS, SPEARMAN

        spec = self.specs[task]
        if spec.regression:
            return (SPEARMAN,)
        if spec.dataset == "nyu-mll/glue" and spec.config == "cola":
            return (ACCURACY, MATTHEWS)  # FusionBench reports CoLA by accuracy; Matthews beside it
        return (ACCURACY,)

    # -- resources ----------------------------------------------------------------------------------------------
    def models_needed(self) -> list[str]:
        """Hub ids the task pool itself reads (the tokenizer's repository; classification adds the experts' heads)."""
        return [self.suite.base_model]

    def _dataset_needs(self, splits: tuple[str, ...] = ("test",)) -> list[tuple[TextTask, str]]:
        return [(s, s.split_name(sp)) for s in self.specs.values() for sp in splits]

    def _missing(self, splits: tuple[str, ...]) -> list[str]:
        models = [f"model {r}" for r in self.models_needed() if hub.model_snapshot(r) is None]
        return models + [hub.describe_dataset(s.dataset, s.config, sp) for s, sp in self._dataset_needs(splits)
                         if not hub.dataset_available(s.dataset, s.config, sp, local_env=DATA_DIR_ENV)]

    def missing_resources(self) -> list[str]:
        """Offline only: the models and test splits that are in neither the hub cache nor a local copy."""
        return self._missing(("test",)) if hub.offline() else []

    def download(self, progress: hub.Progress | None = None) -> None:
        """Fetch the tokenizer's repository (and the experts' heads), and the test and train splits of every task;
        offline, refuse at once naming whatever is still missing."""
        if hub.offline():
            hub.require_online(self._missing(("test", "train")), local_env=DATA_DIR_ENV)
            return
        for repo in self.models_needed():
            hub.download_model(repo, progress)
        for spec, split in self._dataset_needs(("test", "train")):
            hub.download_dataset(spec.dataset, spec.config, split, progress, local_env=DATA_DIR_ENV)

    def version_info(self) -> dict[str, str]:
        return {f"text_tasks/{self.name}": f"{self.suite.base_model}@{hub.model_revision(self.suite.base_model)}"
                                           f" max_length={self.max_length}"}

    # -- tokenization -------------------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(hub.model_location(self.suite.base_model))

    def preprocessing_id(self, task: str) -> str:
        """Changes whenever `encode_texts` would produce different tokens for the same rows."""
        return "plain-v1"

    def encode_texts(self, task: str, columns: dict[str, Sequence[Any]]) -> list[list[int]]:
        """Token ids of each example of a slice of the dataset (no padding; truncated to `max_length`)."""
        spec = self.specs[task]
        texts = [list(columns[f]) for f in spec.text_fields]
        encoded = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
        return [list(x) for x in encoded["input_ids"]]

    def encode_labels(self, task: str, values: Sequence[Any]) -> list[Any]:
        """The labels stored for a slice of the dataset (as the dataset has them unless a pool says otherwise)."""
        return list(values)

    def split(self, task: str, split: str) -> TokenizedSplit:
        if task not in self.specs:
            raise KeyError(f"task pool {self.name!r} has no task {task!r}; tasks: {', '.join(self._tasks)}")
        key = (task, split)
        if key not in self._splits:
            spec = self.specs[task]
            name = spec.split_name(split)
            base = self.suite.base_model
            folder = self.cache_root / "tokens" / cache_key(
                dataset=spec.dataset, config=spec.config, split=name,
                revision=hub.dataset_revision(spec.dataset, spec.config, name, local_env=DATA_DIR_ENV),
                tokenizer=f"{base}@{hub.model_revision(base)}", max_length=self.max_length,
                fields=spec.text_fields, preprocessing=self.preprocessing_id(task))

            def encode(columns: dict[str, Sequence[Any]], task: str = task) -> tuple[list[list[int]], list[float]]:
                return (self.encode_texts(task, columns),
                        self.encode_labels(task, list(columns[self.specs[task].label_field])))

            self._splits[key] = TokenizedSplit(
                folder, lambda: hub.open_dataset(spec.dataset, spec.config, name, local_env=DATA_DIR_ENV), encode,
                self.max_length,
                regression=spec.regression, description=f"{spec.dataset}/{spec.config or ''} [{name}]")
        return self._splits[key]

    # -- batches ------------------------------------------------------------------------------------------------
    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = max(1, min(batch_size, self.batch_size))
        if split == "val":
            train = self.split(task, "train")
            return train.batches(size, limit, indices=validation_indices(len(train)).numpy())
        return self.split(task, split).batches(size, limit)

    def num_examples(self, task: str, split: str = "test") -> int | None:
        if split == "val":
            n = self.split(task, "train").known_length()
            return len(validation_indices(n)) if n else None
        return self.split(task, split).known_length()

    def _cached(self, key: tuple[Any, ...], make: Any) -> Any:
        """`make()` once per key. Made outside inference mode: heads first built while scoring are later
        backpropagated through (Fisher, AdaMerging), which inference tensors refuse."""
        if key not in self._on_device:
            with torch.inference_mode(False), torch.no_grad():
                self._on_device[key] = make()
        return self._on_device[key]
