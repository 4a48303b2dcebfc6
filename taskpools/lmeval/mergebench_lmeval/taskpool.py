"""The `lmeval` task pool: lm-evaluation-harness scores the merged model, mergebench stores what it reports.

The core's evaluation loop asks a task pool for batches and logits; lm-eval instead builds its own requests
(log-likelihoods of choices, greedy generations) and computes its own metrics and standard errors. So this pool
implements `score_model` (`mergebench_core.data.evaluation.ScoresModels`) and the loop hands it the whole model.
Each task's row keeps lm-eval's metric names (`acc`, `acc_norm`, `exact_match,strict-match`), their standard errors
(`acc_stderr`) and the number of examples scored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from importlib import metadata
from typing import Any

import torch
from torch import nn

from mergebench_core.contract.api import Batch, Ensemble, Evaluable, MetricSpec, PerTaskModels, TaskPool
from mergebench_core.errors import ConfigError, MergebenchError
from mergebench_core.pools import hub

from .catalog import TaskInfo, lookup, metric_key
from .params import LmEvalParams
from .wrapper import language_model

log = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]


class LmEvalTaskPool(TaskPool):
    """lm-eval tasks, named as lm-eval names them, scored by lm-eval."""

    def __init__(self, params: LmEvalParams | None = None):
        self.params = params or LmEvalParams()
        if not self.params.tasks:
            raise ConfigError("task pool lmeval needs the lm-eval tasks to score: name them, e.g. "
                              "--taskpool \"lmeval(tasks=arc_easy,gsm8k)\" (local tasks: add include_path=FOLDER)")
        if len(set(self.params.tasks)) != len(self.params.tasks):
            raise ConfigError(f"task pool lmeval names a task twice: {', '.join(self.params.tasks)}")
        self.name = "lmeval"

    @property
    def tasks(self) -> list[str]:
        return list(self.params.tasks)

    @cached_property
    def _catalog(self) -> tuple[Any, dict[str, TaskInfo]]:
        return lookup(self.params.tasks, self.params.include_path)

    @property
    def infos(self) -> dict[str, TaskInfo]:
        return self._catalog[1]

    def metrics(self, task: str) -> Sequence[MetricSpec]:
        return self.infos[task].metric_specs()

    def version_info(self) -> dict[str, str]:
        tasks = {t: {"version": str((i.config.get("metadata") or {}).get("version", "")), "config": i.fingerprint()}
                 for t, i in self.infos.items()}
        return {"lm_eval": metadata.version("lm_eval"), "lmeval_tasks": json.dumps(tasks, sort_keys=True)}

    def missing_resources(self) -> list[str]:
        """Local task files that are not here (nothing can fetch them), and, offline, hub datasets not cached."""
        out: list[str] = []
        offline: bool | None = None
        for info in self.infos.values():
            if not info.reads_local_files:
                offline = hub.offline() if offline is None else offline
                if not offline:
                    continue
            out += info.missing_data()
        return out

    # -- scoring --------------------------------------------------------------------------------------------------
    def score_model(self, evaluable: Evaluable, *, tasks: Sequence[str], limit: int | None, device: torch.device,
                    batch_size: int, split: str) -> Metrics:
        if split != "test":
            raise MergebenchError(f"task pool lmeval scores the split each lm-eval task evaluates on (test, else "
                                  f"validation); it has no {split!r} split for tuning or training")
        if isinstance(evaluable, Ensemble):
            raise MergebenchError("task pool lmeval scores one language model at a time; an output ensemble of "
                                  "several has no lm-eval wrapper")
        if isinstance(evaluable, PerTaskModels):
            out: Metrics = {}
            for task in tasks:
                out.update(self._score(evaluable.models[task], [task], limit, device))
            return out
        return self._score(evaluable, tasks, limit, device)

    def _score(self, model: nn.Module, tasks: Sequence[str], limit: int | None, device: torch.device) -> Metrics:
        from lm_eval import simple_evaluate

        manager = self._catalog[0]
        lm = language_model(model, self.params, device)
        with global_random_state_kept(device):  # lm-eval seeds Python's, NumPy's and torch's global generators
            results = simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
                num_fewshot=None if self.params.num_fewshot < 0 else self.params.num_fewshot,
                bootstrap_iters=self.params.bootstrap_iters)
        if results is None:
            raise MergebenchError("lm-eval returned no results (it does so on processes other than rank 0)")
        return {task: task_row(task, results) for task in tasks}

    # -- the core's batch interface, which lm-eval tasks do not have ---------------------------------------------
    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterable[Batch]:
        raise MergebenchError(self._no_batches())

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        raise MergebenchError(self._no_batches())

    def _no_batches(self) -> str:
        return ("task pool lmeval is scored by lm-evaluation-harness and hands out no batches or logits; a method "
                "that reads task data (Fisher, RegMean, AdaMerging, training methods) needs a task pool that does")


@contextlib.contextmanager
def global_random_state_kept(device: torch.device) -> Iterator[None]:
    """Run lm-eval without changing what the rest of the run draws: it reseeds the global generators (for its own
    reproducibility), which would otherwise leak into whatever the same process does next."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def task_row(task: str, results: Mapping[str, Any]) -> dict[str, float]:
    """lm-eval's numbers for one task: `metric[,filter]` and `metric_stderr[,filter]` as lm-eval keys them (the
    "none" filter left out of the name), and `examples`, the number of documents scored."""
    reported = results["results"].get(task)
    if reported is None:
        raise MergebenchError(f"lm-eval reported no results for task {task!r} (it reported "
                              f"{', '.join(results['results']) or 'none'})")
    row: dict[str, float] = {}
    for key, value in reported.items():
        if key in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # lm-eval writes "N/A" for a standard error it could not compute
        if not math.isfinite(value):
            log.info("lm-eval reported %s = %s for task %s; not stored", key, value, task)
            continue
        name, _, filter_name = key.partition(",")
        row[metric_key(name, filter_name or "none")] = float(value)
    samples = (results.get("n-samples") or {}).get(task) or {}
    if "effective" in samples:
        row["examples"] = float(samples["effective"])
    return row
