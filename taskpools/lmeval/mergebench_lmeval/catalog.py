"""What lm-eval says about a task before it runs: its YAML config, its metrics (primary first) and where its data is.

Read from lm-eval's own task index (`TaskManager`), without building the task: building one loads its dataset,
which on an offline machine is exactly what must be checked first. lm-eval's index of its built-in tasks takes
seconds to build, so a run whose tasks all lie in `include_path` indexes that folder alone.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergebench_core.contract.api import MetricSpec
from mergebench_core.errors import ConfigError, MergebenchError
from mergebench_core.pools import hub

log = logging.getLogger(__name__)

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
"""`dataset_path` values that name a file format rather than a hub dataset: their `data_files` are local paths."""


@dataclass(frozen=True)
class TaskInfo:
    """One lm-eval task as its config describes it."""

    name: str
    config: Mapping[str, Any]
    yaml_path: Path | None

    @property
    def output_type(self) -> str:
        return str(self.config.get("output_type", "generate_until"))

    @property
    def filters(self) -> list[str]:
        """The filter names lm-eval appends to metric keys (`exact_match,strict-match`); "none" without filters."""
        return [str(f["name"]) for f in self.config.get("filter_list") or []] or ["none"]

    def metric_specs(self) -> list[MetricSpec]:
        """The task's metrics as lm-eval will report them, primary first: its `metric_list` (or lm-eval's defaults
        for the output type), once per filter, named `metric` under the "none" filter and `metric,filter` else."""
        from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY, is_higher_better

        listed = self.config.get("metric_list")
        entries = [(str(m["metric"]), m.get("higher_is_better")) for m in listed] if listed else \
            [(m, None) for m in DEFAULT_METRIC_REGISTRY.get(self.output_type, ["acc"])]
        specs = []
        for filt in self.filters:
            for name, higher in entries:
                if higher is None:
                    higher = is_higher_better(name)
                specs.append(MetricSpec(metric_key(name, filt), higher_is_better=bool(True if higher is None else
                                                                                       higher)))
        return specs

    def data_files(self) -> list[Path]:
        """The local files a file-format task reads (`dataset_path: json` with `dataset_kwargs.data_files`)."""
        files = (self.config.get("dataset_kwargs") or {}).get("data_files") or {}
        values = files.values() if isinstance(files, Mapping) else [files]
        out: list[Path] = []
        for v in values:
            out += [Path(p) for p in (v if isinstance(v, (list, tuple)) else [v])]
        return out

    @property
    def reads_local_files(self) -> bool:
        return str(self.config.get("dataset_path") or "") in LOCAL_BUILDERS

    def missing_data(self) -> list[str]:
        """What this task reads that is not on this machine, one line each (a hub dataset counts as present when
        the hub cache holds it)."""
        path = str(self.config.get("dataset_path") or "")
        if self.reads_local_files:
            return [f"lm-eval task {self.name}: data file {p} (named in {self.yaml_path})"
                    for p in self.data_files() if not p.is_file()]
        if not path or Path(path).expanduser().exists():
            return []
        name = self.config.get("dataset_name")
        if hub.cached_snapshot(path, "dataset") is not None:
            return []
        return [f"lm-eval task {self.name}: {hub.describe_dataset(path, name, self.test_split or 'test')}"]

    @property
    def test_split(self) -> str | None:
        return self.config.get("test_split") or self.config.get("validation_split")

    def fingerprint(self) -> str:
        """A digest of what changes this task's numbers on this machine: its config and its local data files."""
        digest = hashlib.sha256(repr(sorted((k, repr(v)) for k, v in self.config.items())).encode())
        for p in self.data_files():
            if p.is_file():
                digest.update(p.read_bytes())
        return digest.hexdigest()[:16]


def metric_key(metric: str, filter_name: str) -> str:
    return metric if filter_name == "none" else f"{metric},{filter_name}"


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str, include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path or None, include_defaults=include_defaults)


def lookup(tasks: Sequence[str], include_path: str = "") -> tuple[Any, dict[str, TaskInfo]]:
    """lm-eval's task manager that knows every named task, and each task's config; an unknown name is refused with
    the closest lm-eval names, a group or tag with its member tasks (this pool scores tasks one by one)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise MergebenchError(f"task pool lmeval needs lm-evaluation-harness ({exc}); install it with "
                              f"`pip install 'mergebench[lmeval]'`") from None
    if include_path and not Path(include_path).expanduser().is_dir():
        raise ConfigError(f"task pool lmeval: include_path {include_path!r} is not a folder; give the folder that "
                          f"holds your lm-eval task YAML files")
    manager = task_manager(include_path, False) if include_path else None
    if manager is None or any(t not in manager.task_index for t in tasks):
        manager = task_manager(include_path, True)
    out = {}
    for task in tasks:
        entry = manager.task_index.get(task)
        if entry is None:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" or in {include_path}" if include_path else " (add your own with include_path=FOLDER)"
            raise ConfigError(f"task pool lmeval: lm-eval has no task {task!r}{where}{hint}")
        kind = getattr(entry.kind, "name", str(entry.kind)).upper()
        if "TASK" not in kind:
            members = sorted(n for n, e in manager.task_index.items()
                             if task in (e.tags or ()) or task in str((e.cfg or {}).get("group", "")))
            raise ConfigError(f"task pool lmeval: {task!r} is an lm-eval {kind.lower()}, not a task; name its tasks "
                              f"(e.g. {', '.join(members[:5]) or 'see `lm_eval ls tasks`'})")
        out[task] = TaskInfo(task, dict(entry.cfg or {}), entry.yaml_path)
    return manager, out
