"""Expands a selection into cells, runs each, and stores each result the moment it is known.

Everything that can be checked before work starts is checked first (names, parameters, pool construction), so a
typo fails in a second, not after an hour of merging. A cell that raises is stored as failed, with its error and
traceback, and the grid goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from mergebench_core.contract.api import PRETRAINED, Ensemble, Method, ModelPool, PerTaskModels, Registration, RunContext, TaskPool
from mergebench_core.contract.config import build_params, check_overrides_used, load_yaml, params_dict, parse_overrides
from mergebench_core.errors import ConfigError, MergebenchError
from mergebench_core.data.evaluation import Metrics, evaluate, primary_metrics, primary_value
from mergebench_core.running.executors import ForkExecutor, InProcessExecutor, Job, can_fork
from mergebench_core.running.loggers import LoggerSet
from mergebench_core.engine.merging import TensorMergeMethod
from mergebench_core.paths import cache_dir
from mergebench_core.pools.params import POOL_SECTION, POOL_TARGET, canonical_names, check_pool_settings, make_pool, pool_section
from mergebench_core.pools.views import PoolName, TaskSubsetModelPool, TaskSubsetTaskPool
from mergebench_core.preferences.vectors import Preference, PreferenceRequest, from_config
from mergebench_core.contract.registry import Registry
from mergebench_core.running.resources import measure
from mergebench_core.engine.roles import DEFAULT_BN_STATS, Role, check_bn_stats, declared_roles, has_running_stats, model_roles
from mergebench_core.engine.running_stats import settle_running_stats
from mergebench_core.results.store import CellResult, ResultStore, cell_key
from mergebench_core.training.methods import DerivedModelPool, MissingTrainedModel, TrainedModelCache, TrainingMethod

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    methods: Sequence[str] | None = None
    """Method names; None runs every installed method."""
    modelpools: Sequence[str] | None = None
    """Model pool names; None runs the pools their plugins mark as default."""
    taskpool: str | None = None
    """Score with this task pool instead of each model pool's default."""
    overrides: Sequence[str] = ()
    config_file: str | Path | None = None
    seeds: Sequence[int] = (0,)
    limit: int | None = None
    device: str = "auto"
    rerun: bool = False
    batch_size: int = 256
    cache_dir: Path = field(default_factory=cache_dir)
    dtype: str | None = None
    """Load models in this dtype (pools that support it: float32, bfloat16, float16)."""
    trust_pickle: bool = False
    """Allow pools to unpickle checkpoints (arbitrary code); off by default."""
    tasks: Sequence[str] | None = None
    """Restrict every pool to the experts and tasks of these tasks (`--tasks digits,rot90`)."""
    preferences: PreferenceRequest = field(default_factory=PreferenceRequest)
    """Preference vectors for preference-aware methods; the config file's `preferences:` are added to these."""
    eval_only: bool = False
    """Never train: training methods load their cached model or the run is refused before any work."""
    loggers: Sequence[str] = ()
    """Registered loggers to switch on besides the JSON lines beside the store (`--logger wandb`)."""
    jobs: int = 1
    """Cells run at once, each in its own worker process (`--jobs`)."""
    cell_timeout: float | None = None
    """Seconds after which a cell's worker is stopped and the cell stored as failed (`--cell-timeout`)."""
    isolation: str = "process"
    """"process": each cell in a fresh worker process (a cell cannot change what later cells see, and a crash or
    sys.exit fails only its cell); "none": in the driver's process (for a debugger; no timeouts, one job)."""
    executor: str = "local"
    """"local" (worker processes on this machine) or "ray" (Ray tasks, `--executor ray`)."""
    ray_address: str | None = None
    """An existing Ray cluster to send cells to (`ray.init(address=...)`); None starts or joins a local Ray."""
    bn_stats: str | None = None
    """How merges settle batch-norm running statistics (`--bn-stats`: base, mean, recompute); None: the config
    file's `bn_stats:`, else mean. See `mergebench_core.engine.running_stats`."""


@dataclass
class Cell:
    method: str
    method_cls: type[Method]
    registration: Registration
    params: Any
    modelpool: str
    taskpool: str
    seed: int
    preference: Preference | None = None

    @property
    def label(self) -> str:
        pref = f" at preference {self.preference.label()}" if self.preference is not None else ""
        return f"{self.method} on {self.modelpool}{pref}"


@dataclass
class RunReport:
    results: list[CellResult] = field(default_factory=list)
    skipped: int = 0
    not_applicable: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    interrupted: int = 0
    """Rows left uncomputed because the user pressed Ctrl-C."""
    unwritten: list[str] = field(default_factory=list)
    """Why each computed row the store refused was not written, and where it was kept instead."""

    @property
    def failed(self) -> list[CellResult]:
        return [r for r in self.results if r.status != "ok"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment_versions() -> dict[str, str]:
    out = {}
    for dist in ("mergebench", "torch", "transformers"):
        v = _version(dist)
        if v:
            out[dist] = v
    return out


class Runner:
    """Plans a selection into cells and runs them. `store` may be set after `plan()`, so a run refused while planning
    leaves no results file behind."""

    def __init__(self, registry: Registry, store: ResultStore | None, options: RunOptions,
                 progress: Callable[..., Iterator[Any]] | None = None):
        self.registry, self.options, self.progress = registry, options, progress
        self.logger_set = LoggerSet(None, {name: registry.logger(name).obj for name in options.loggers})
        self.store = store
        self.device = resolve_device(options.device)
        self._modelpools: dict[str, ModelPool] = {}
        self._taskpools: dict[str, TaskPool] = {}
        self.not_applicable: list[str] = []
        self.notes: list[str] = []
        self.trained = TrainedModelCache(Path(options.cache_dir) / "trained")
        self.bn_stats = check_bn_stats(options.bn_stats or DEFAULT_BN_STATS)
        self._roles: dict[str, dict[str, Role]] = {}

    # -- pools ------------------------------------------------------------------------------------------------
    def modelpool(self, name: str) -> ModelPool:
        """The pool a (possibly extended) name addresses: `POOL`, `POOL+METHOD(k=v)`, either with `[task,...]`."""
        if name not in self._modelpools:
            parsed = PoolName.parse(name)
            if parsed.tasks is not None:
                inner = self.modelpool(parsed.unrestricted)
                pool: ModelPool = TaskSubsetModelPool(inner, parsed.tasks, name)
            elif parsed.method is not None:
                pool = self._derived(parsed)
            else:  # a plain pool, with its parameters if it declares any (`pool_params`)
                pool = make_pool(self.registry.modelpool(parsed.base), parsed)
                pool.configure(dtype=self.options.dtype, trust_pickle=self.options.trust_pickle)
            self._modelpools[name] = pool
        return self._modelpools[name]

    def _derived(self, parsed: PoolName) -> DerivedModelPool:
        base = self.modelpool(parsed.pool)
        reg = self.registry.method_registration(parsed.method or "")
        method_cls = reg.obj
        if not (issubclass(method_cls, TrainingMethod) and method_cls.produces == "pool"):
            makers = sorted(n for n, r in self.registry.methods.items()
                            if issubclass(r.obj, TrainingMethod) and r.obj.produces == "pool")
            raise ConfigError(f"pool {parsed.unrestricted!r}: method {reg.name!r} does not re-train experts, so it "
                              f"cannot derive a pool; methods that can: {', '.join(makers) or 'none installed'}")
        reason = method_cls.cannot_run_on(base)
        if reason:
            raise ConfigError(f"pool {parsed.unrestricted!r} cannot be derived: {reg.name} cannot run on "
                              f"{base.name}: {reason}")
        configs = build_params(reg.name, method_cls.Params, None, [
            o for o in parse_overrides([f"{reg.name}.{p}" for p in parsed.params])])
        if len(configs) != 1:
            raise ConfigError(f"pool {parsed.unrestricted!r}: a derived pool takes one value per parameter")
        taskpool = self.taskpool(self._base_taskpool(base))
        return DerivedModelPool(base, taskpool, method_cls(configs[0]), name=parsed.unrestricted,
                                cache=self.trained, code_version=_code_version(reg), device=self.device,
                                eval_only=self.options.eval_only, loggers=self.loggers())

    def taskpool(self, name: str) -> TaskPool:
        if name not in self._taskpools:
            parsed = PoolName.parse(name)
            if parsed.tasks is not None:
                pool: TaskPool = TaskSubsetTaskPool(self.taskpool(parsed.unrestricted), parsed.tasks, name)
            else:
                reg = self.registry.taskpool(name)
                pool = reg.obj()
                pool.name = pool.name or reg.name
                pool.configure(dtype=self.options.dtype, trust_pickle=self.options.trust_pickle)
            self._taskpools[name] = pool
        return self._taskpools[name]

    def _base_taskpool(self, pool: ModelPool) -> str:
        if self.options.taskpool:
            return self.registry.taskpool(PoolName.parse(self.options.taskpool).base).name
        if not pool.default_taskpool:
            raise MergebenchError(f"model pool {pool.name!r} names no default task pool; pass --taskpool")
        return self.registry.taskpool(pool.default_taskpool).name

    def taskpool_for(self, modelpool: str) -> str:
        """The task pool that scores `modelpool`, restricted to the same tasks when the model pool is."""
        parsed = PoolName.parse(modelpool)
        base = self._base_taskpool(self.modelpool(parsed.unrestricted))
        return PoolName(base).with_tasks(parsed.tasks)

    @property
    def store(self) -> ResultStore | None:
        return self._store

    @store.setter
    def store(self, store: ResultStore | None) -> None:
        """Curves are written beside the store, so the loggers follow it (set after planning, see the class)."""
        self._store = store
        self.logger_set.store_path = store.path if store is not None and str(store.path) != ":memory:" else None

    def loggers(self) -> LoggerSet:
        return self.logger_set

    # -- planning ---------------------------------------------------------------------------------------------
    def plan(self) -> list[Cell]:
        """Every cell of the selection, with every check that needs no computation done first: names, parameters,
        tasks, preferences, applicability, cached models for --eval-only, and resources."""
        opts = self.options
        explicit = bool(opts.methods)
        check_device(self.device)
        self.check_execution()
        if opts.limit is not None and opts.limit < 1:
            raise ConfigError(f"--limit {opts.limit}: score at least one example per task (or drop --limit)")
        if opts.batch_size < 1:
            raise ConfigError(f"--batch-size {opts.batch_size}: a batch holds at least one example")
        method_names = list(opts.methods) if opts.methods else sorted(self.registry.methods)
        regs = [self.registry.method_registration(m) for m in method_names]
        overrides = parse_overrides(opts.overrides)
        yaml_cfg = load_yaml(opts.config_file)
        check_sections(yaml_cfg, opts.config_file, self.registry.methods)
        pool_cfg = pool_section(yaml_cfg)
        pool_names = self.resolve_pool_names(opts.modelpools, pool_cfg, overrides)
        overrides = [o for o in overrides if o.target != POOL_TARGET]
        if opts.tasks:
            pool_names = [PoolName.parse(p).with_tasks(list(opts.tasks)) for p in pool_names]
        if "bn_stats" in yaml_cfg:
            configured = yaml_cfg.pop("bn_stats")
            self.bn_stats = check_bn_stats(opts.bn_stats or str(configured))
        preferences = opts.preferences
        if "preferences" in yaml_cfg:
            preferences = preferences + from_config(yaml_cfg.pop("preferences"))
        check_overrides_used(overrides, {r.name: r.obj.Params for r in regs})
        cells, refused = [], []
        ignoring: set[str] = set()
        for pool_name in pool_names:
            pool = self.modelpool(pool_name)
            taskpool_name = self.taskpool_for(pool_name)
            tasks = self.taskpool(taskpool_name).tasks
            check_scores(pool, self.taskpool(taskpool_name))
            prefs = preferences.expand(tasks) if preferences else []
            for reg in regs:
                for params in build_params(reg.name, reg.obj.Params, yaml_cfg, overrides):
                    impossible = reg.obj.cannot_run_on(pool)
                    reason = impossible or (None if explicit else reg.obj.unsuitable_for(pool, params))
                    if reason:
                        line = f"{reg.name} on {pool_name}: {reason}"
                        (refused if explicit and impossible else self.not_applicable).append(line)
                        continue
                    aware = reg.obj.info.preference_aware
                    if prefs and not aware:
                        ignoring.add(reg.name)
                    for pref in (prefs if aware and prefs else [None]):
                        for seed in opts.seeds:
                            cells.append(Cell(reg.name, reg.obj, reg, params, pool_name, taskpool_name, seed, pref))
        if refused:
            raise ConfigError("these methods cannot run on the selected pools:" + "".join(f"\n  - {r}" for r in refused))
        if not explicit:  # a conflicted method name is unusable: say so rather than leave it out silently
            self.not_applicable += self.registry.conflict_lines("method")
        self.not_applicable = group_reasons(self.not_applicable)
        if ignoring:
            self.notes.append(f"preferences apply only to preference-aware methods; {', '.join(sorted(ignoring))} "
                              f"ignore them and ran once per pool")
        self.check_resources(dict.fromkeys((c.modelpool, c.taskpool) for c in cells))
        if opts.eval_only:
            self.check_trained(cells)
        return cells

    def resolve_pool_names(self, names: Sequence[str] | None, pool_cfg: dict[str, Any] | None = None,
                           overrides: Sequence[Any] = ()) -> list[str]:
        """The canonical names of the pools a selection names (None: the pools marked default), with the config
        file's `modelpool:` section and `pool.` overrides applied (a `pool.` sweep gives a pool per value); a setting
        no selected pool declares is refused (`pool_params`)."""
        if not names:
            names = [n for n, r in sorted(self.registry.modelpools.items()) if r.default]
            if not names:
                raise MergebenchError("no model pool selected and no installed pool is marked as default; "
                                      "pass --modelpool (see `mergebench list`)")
        check_pool_settings([self.registry.modelpool(PoolName.parse(n).base) for n in names], pool_cfg, overrides)
        return list(dict.fromkeys(c for n in names for c in canonical_names(self.registry, n, pool_cfg, overrides)))

    def check_resources(self, pairs: Iterable[tuple[str, str]]) -> None:
        """One error naming every missing model and dataset of every selected pool, before any work starts."""
        pairs = list(pairs)
        missing: dict[str, None] = {}
        pools = list(dict.fromkeys(p for p, _ in pairs))
        for pool_name, taskpool_name in pairs:
            for item in [*self.modelpool(pool_name).missing_resources(),
                         *self.taskpool(taskpool_name).missing_resources()]:
                missing[item] = None
        if missing:
            listing = "".join(f"\n  - {m}" for m in missing)
            commands = "\n".join(f"  mergebench download --modelpool {p}" for p in pools)
            raise MergebenchError(f"{len(missing)} resource(s) needed by this run are not on this machine and "
                                  f"cannot be fetched now (offline):{listing}\n"
                                  f"Fetch them on a machine with internet:\n{commands}")

    def check_trained(self, cells: Sequence[Cell]) -> None:
        """--eval-only: every model a cell would train, and every expert of a derived pool, must be cached."""
        missing = []
        for pool_name in dict.fromkeys(c.modelpool for c in cells):
            pool = self.modelpool(pool_name)
            derived = pool.inner if isinstance(pool, TaskSubsetModelPool) else pool
            if isinstance(derived, DerivedModelPool):
                absent = [e for e in pool.expert_names if not derived.is_built(e)]
                if absent:
                    missing.append(f"the experts of derived pool {pool_name}: {', '.join(absent)}")
        for cell in cells:
            if issubclass(cell.method_cls, TrainingMethod):
                pool, taskpool = self.modelpool(cell.modelpool), self.taskpool(cell.taskpool)
                method = cell.method_cls(cell.params)
                pref = cell.preference.normalized if cell.preference is not None else None
                if not method.is_cached(pool, taskpool, taskpool.tasks, seed=cell.seed, preference=pref,
                                        cache=self.trained, code_version=_code_version(cell.registration)):
                    missing.append(cell.label + f" (seed {cell.seed})")
        if missing:
            raise MissingTrainedModel("--eval-only: these models were never trained with these settings, and "
                                      "--eval-only never trains:" + "".join(f"\n  - {m}" for m in missing) +
                                      "\nRun without --eval-only to train them once (they are cached after that).")

    # -- running ----------------------------------------------------------------------------------------------
    def executor(self) -> Any:
        opts = self.options
        if opts.executor == "ray":
            from mergebench_core.running.ray_executor import RayExecutor

            return RayExecutor(self, address=opts.ray_address, timeout=opts.cell_timeout)
        if opts.isolation == "none" or not can_fork():
            return InProcessExecutor()
        return ForkExecutor(opts.jobs, opts.cell_timeout)

    def check_execution(self) -> None:
        opts = self.options
        if opts.executor not in ("local", "ray"):
            raise ConfigError(f"--executor {opts.executor!r}: use local or ray")
        if opts.isolation not in ("process", "none"):
            raise ConfigError(f"--isolation {opts.isolation!r}: use process or none")
        if opts.jobs < 1:
            raise ConfigError(f"--jobs {opts.jobs}: run at least one cell at a time")
        if opts.cell_timeout is not None and opts.cell_timeout <= 0:
            raise ConfigError(f"--cell-timeout {opts.cell_timeout:g}: give a positive number of seconds")
        in_process = opts.executor == "local" and (opts.isolation == "none" or not can_fork())
        if in_process and (opts.jobs > 1 or opts.cell_timeout is not None):
            why = "--isolation none" if opts.isolation == "none" else "this platform cannot fork worker processes"
            raise ConfigError(f"--jobs and --cell-timeout need worker processes, and {why}")
        if opts.executor == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise ConfigError("--executor ray needs Ray: pip install 'mergebench[ray]'") from None

    def run(self, cells: list[Cell] | None = None) -> RunReport:
        """Every reference row and cell not already in the store, each stored the moment it is known. Reference rows
        come first: a cell's normalised score divides by the experts' row."""
        cells = self.plan() if cells is None else cells
        store = self.store
        if store is None:
            raise MergebenchError("the runner has no results store to write to")
        report = RunReport(not_applicable=list(self.not_applicable), notes=list(self.notes))
        executor = self.executor()
        ref_jobs = []
        for pool_name, taskpool_name in dict.fromkeys((c.modelpool, c.taskpool) for c in cells):
            seeds = sorted({c.seed for c in cells if c.modelpool == pool_name})
            for job, stored in self.reference_jobs(pool_name, taskpool_name, seeds):
                if stored is not None:
                    report.results.append(stored)
                else:
                    ref_jobs.append(job)
        jobs = []
        for cell in cells:
            stored = None if self.options.rerun else store.get(self.key(cell))
            if stored is not None and stored.status == "ok":
                log.info("skipping %s (already in the store)", cell.label)
                report.results.append(stored)
                report.skipped += 1
            else:
                jobs.append(self.cell_job(cell))
        progress = GridProgress(len(ref_jobs) + len(jobs))
        # Reference rows are mergebench's own evaluation, run here: they also warm this process (imports, data,
        # heads), so every worker forked for a cell afterwards starts warm.
        try:
            for runner, batch in ((InProcessExecutor(), ref_jobs), (executor, jobs)):
                for job, result in runner.run(batch):
                    if result.kind == "method" and result.status == "ok":
                        result.normalized_mean = self._normalized(result)
                    try:
                        store.put(result)
                    except MergebenchError as exc:  # kept aside (the message says where): the grid goes on
                        log.error("%s", exc)
                        report.unwritten.append(str(exc))
                    report.results.append(result)
                    progress.done(job.label, result)
        except KeyboardInterrupt:  # what finished is stored; the table of it is still worth printing
            report.interrupted = len(ref_jobs) + len(jobs) - progress.count
            log.warning("interrupted: %d row(s) not computed; run again to compute them", report.interrupted)
        if report.unwritten:
            log.error("%d computed row(s) could not be written to the results store %s; the messages above say "
                      "where each was kept instead, and the next `mergebench run` adds them", len(report.unwritten),
                      store.path)
        return report

    def key(self, cell: Cell) -> str:
        pref = list(cell.preference.normalized) if cell.preference is not None else None
        return cell_key("method", cell.method, params_dict(cell.params), cell.modelpool, cell.taskpool, cell.seed,
                        self.options.limit, pref, self.identity(cell.modelpool, cell.taskpool, cell.registration))

    def identity(self, modelpool: str, taskpool: str, registration: Registration | None = None) -> dict[str, Any]:
        """The versions a cell's numbers depend on beyond its names: the plugin's, the pool's recipe or hub revisions,
        the task pool's. Part of the cell key: change any of them and the cell is computed again."""
        out: dict[str, Any] = {"modelpool": self.modelpool(modelpool).version_info(),
                               "taskpool": self.taskpool(taskpool).version_info()}
        if registration is not None:
            out["plugin"] = _code_version(registration)
            if has_running_stats(self.pool_roles(modelpool)):  # only there: other pools' keys stay as they were
                out["bn_stats"] = self.bn_stats
        return out

    def pool_roles(self, modelpool: str) -> dict[str, Role]:
        """The tensor roles of a pool's models (`mergebench_core.engine.roles`), from its pretrained model and what the pool
        declares; computed once per pool. Pools without a pretrained model give only what they declare (loading a
        model of theirs may mean training it)."""
        if modelpool not in self._roles:
            pool = self.modelpool(modelpool)
            try:
                model = pool.load_model(PRETRAINED) if pool.has_pretrained else None
                self._roles[modelpool] = model_roles(model, declared_roles(pool))
            except Exception as exc:  # a pool that cannot load here fails its cells with the real error later
                log.warning("cannot read the tensor roles of pool %s (%s); assuming no running statistics",
                            modelpool, exc)
                self._roles[modelpool] = {}
        return self._roles[modelpool]

    def _evaluate(self, taskpool: TaskPool, model: Any, tasks: Sequence[str] | None = None) -> Metrics:
        return evaluate(taskpool, model, tasks=tasks, limit=self.options.limit, device=self.device,
                        batch_size=self.options.batch_size, progress=self.progress)

    def reference_jobs(self, pool_name: str, taskpool_name: str, seeds: Sequence[int] = (0,)
                       ) -> list[tuple[Job, CellResult | None]]:
        """The reference rows of a pool, each with its stored row when there is one: the pretrained model on every
        task and each expert on its own task; for pools of independently trained models, each model on every task
        and the best of them (their ensemble is the `ensemble` method's row), once per seed of `seeds` when the pool's
        models depend on the seed (`for_seed`), else once."""
        pool = self.modelpool(pool_name)
        labels = (["pretrained"] if pool.has_pretrained else []) + \
            ([f"model {n}" for n in pool.expert_names] + ["best model"]
             if pool.relation == "independent" else ["individual"])
        out = []
        for seed in (seeds or [0]) if getattr(pool, "for_seed", None) is not None else [0]:
            for label in labels:
                blank = functools.partial(self._reference_blank, pool_name, taskpool_name, label, seed)
                stored = None if self.options.rerun else self.store.get(blank().cell_key)  # type: ignore[union-attr]
                job = Job(f"{label} on {pool_name}" + (f" (seed {seed})" if seed else ""),
                          functools.partial(self.reference, pool_name, taskpool_name, label, seed),
                          blank, spec=("reference", pool_name, taskpool_name, label, seed))
                out.append((job, stored if stored is not None and stored.status == "ok" else None))
        return out

    def references(self, pool_name: str, taskpool_name: str) -> list[CellResult]:
        """A pool's reference rows, computing (in this process) and storing those not stored yet."""
        assert self.store is not None
        rows = []
        for job, stored in self.reference_jobs(pool_name, taskpool_name):
            if stored is None:
                stored = job.work()
                self.store.put(stored)
            rows.append(stored)
        return rows

    def _reference_blank(self, pool_name: str, taskpool_name: str, label: str, seed: int = 0) -> CellResult:
        return CellResult("reference", label, {}, pool_name, taskpool_name, seed, self.options.limit,
                          versions=environment_versions(), identity=self.identity(pool_name, taskpool_name))

    def reference(self, pool_name: str, taskpool_name: str, label: str, seed: int = 0) -> CellResult:
        """Compute one reference row (in a worker)."""
        result = self._reference_blank(pool_name, taskpool_name, label, seed)
        try:
            pool, taskpool = seeded_pool(self.modelpool(pool_name), seed), self.taskpool(taskpool_name)
            result.primary_metrics = primary_metrics(taskpool, taskpool.tasks)
            with measure(self.device) as m:
                if label == "individual":
                    result.metrics = {}
                    for expert in pool.expert_names:
                        if pool.task_of(expert) in taskpool.tasks:
                            result.metrics.update(self._evaluate(taskpool, pool.load_model(expert),
                                                                 [pool.task_of(expert)]))
                elif label == "best model":  # the model with the best mean test score, as papers report it
                    scores = [self._evaluate(taskpool, pool.load_model(n)) for n in pool.expert_names]
                    primary = primary_metrics(taskpool, taskpool.tasks)
                    best = max(range(len(scores)), key=lambda i: primary_mean(scores[i], primary) or 0.0)
                    result.metrics = scores[best]
                    result.extras = {"model": pool.expert_names[best]}
                else:
                    name = PRETRAINED if label == "pretrained" else label.removeprefix("model ")
                    result.metrics = self._evaluate(taskpool, pool.load_model(name))
            result.eval_seconds = m.seconds
            result.mean = primary_mean(result.metrics, result.primary_metrics)
        except Exception as exc:
            self._fail(result, exc)
        return result

    def cell_job(self, cell: Cell) -> Job:
        pref = cell.preference.given if cell.preference is not None else None
        return Job(cell.label, functools.partial(self.run_cell, cell), functools.partial(self._blank, cell),
                   spec=("method", cell.method, params_dict(cell.params), cell.modelpool, cell.taskpool, cell.seed,
                         pref))

    def _blank(self, cell: Cell) -> CellResult:
        """The row of a cell before it runs: what produced it, and nothing measured yet."""
        versions = environment_versions()
        versions[cell.registration.distribution or cell.registration.plugin] = cell.registration.version
        pref = cell.preference
        return CellResult(
            "method", cell.method, params_dict(cell.params), cell.modelpool, cell.taskpool, cell.seed,
            self.options.limit, preference=list(pref.normalized) if pref is not None else None,
            versions=versions, task_specific=cell.method_cls.info.task_specific,
            identity=self.identity(cell.modelpool, cell.taskpool, cell.registration),
            config={"method": cell.method, "params": params_dict(cell.params), "modelpool": cell.modelpool,
                    "taskpool": cell.taskpool, "seed": cell.seed, "limit": self.options.limit,
                    "device": str(self.device),
                    "preference_given": list(pref.given) if pref is not None else None,
                    "eval_only": self.options.eval_only,
                    **({"bn_stats": self.bn_stats} if has_running_stats(self.pool_roles(cell.modelpool)) else {})})

    def run_cell(self, cell: Cell) -> CellResult:
        """Run one cell (in a worker) and return its row; its normalised score is the driver's to add."""
        log.info("running %s (%s)", cell.label, params_dict(cell.params))
        pref = cell.preference
        result = self._blank(cell)
        loggers = self.loggers()
        metrics_logger = loggers.open(self.key(cell), result.config)
        try:
            pool, taskpool = seeded_pool(self.modelpool(cell.modelpool), cell.seed), self.taskpool(cell.taskpool)
            result.versions.update(pool.version_info())
            result.versions.update(taskpool.version_info())
            result.primary_metrics = primary_metrics(taskpool, taskpool.tasks)
            ctx = RunContext(taskpool=taskpool, device=self.device, seed=cell.seed,
                             preference=pref.normalized if pref is not None else None, tasks=tuple(taskpool.tasks),
                             eval_only=self.options.eval_only, metrics_logger=metrics_logger, loggers=loggers,
                             method_version=_code_version(cell.registration),
                             cache_dir=Path(self.options.cache_dir), progress=self.progress,
                             log=logging.getLogger(f"mergebench.method.{cell.method}"), bn_stats=self.bn_stats)
            torch.manual_seed(cell.seed)
            method = cell.method_cls(cell.params)
            with measure(self.device) as merge_m:
                output = method.run(pool, ctx)
                if cell.method_cls.info.kind == "merge":  # running statistics follow the run's rule, not the method
                    output.extras.update(settle_running_stats(
                        output.model, pool, self.bn_stats, self.pool_roles(cell.modelpool), taskpool=taskpool,
                        tasks=taskpool.tasks, seed=cell.seed, device=self.device,
                        set_by_engine=isinstance(method, TensorMergeMethod)))
            result.merge_seconds, result.peak_memory_mb = merge_m.seconds, merge_m.peak_mb
            result.extras = _jsonable(output.extras)
            check_finite_weights(output.model)
            with measure(self.device) as eval_m:
                result.metrics = self._evaluate(taskpool, output.model)
            result.eval_seconds = eval_m.seconds
            result.mean = primary_mean(result.metrics, result.primary_metrics)
        except Exception as exc:  # the grid goes on; the error is kept with the cell
            self._fail(result, exc)
        finally:
            try:
                metrics_logger.summary(
                    {"status": result.status, "error": result.error, "metrics": result.metrics, "mean": result.mean,
                     "merge_seconds": result.merge_seconds, "eval_seconds": result.eval_seconds,
                     "peak_memory_mb": result.peak_memory_mb, "versions": result.versions, "extras": result.extras})
            except Exception as exc:  # a logger's failure is reported, never the cell's
                log.warning("a logger failed to record the outcome of %s: %s", cell.label, exc)
            finally:
                metrics_logger.close()
        return result

    def _normalized(self, result: CellResult) -> float | None:
        assert self.store is not None
        key = cell_key("reference", "individual", {}, result.modelpool, result.taskpool, 0, self.options.limit, None,
                       self.identity(result.modelpool, result.taskpool))
        ref = self.store.get(key)
        if ref is None or ref.status != "ok":
            return None
        return normalized_mean(result.metrics, ref.metrics, result.primary_metrics)

    @staticmethod
    def _fail(result: CellResult, exc: BaseException) -> None:
        log.error("%s on %s failed: %s", result.method, result.modelpool, exc)
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()


def seeded_pool(pool: ModelPool, seed: int) -> ModelPool:
    """The pool a cell of seed `seed` uses: pools whose models are drawn per seed (independent pools trained from
    pool seed s) implement `for_seed(seed)`; others are the same for every seed."""
    for_seed = getattr(pool, "for_seed", None)
    return pool if for_seed is None else for_seed(seed)


def primary_mean(metrics: Metrics, primary: dict[str, dict[str, Any]]) -> float | None:
    """Mean over tasks of each task's primary metric (accuracy unless the task pool declares another)."""
    values = [v for t in metrics if (v := primary_value(metrics, primary, t)) is not None]
    return sum(values) / len(values) if values else None


def normalized_mean(metrics: Metrics, individual: Metrics, primary: dict[str, dict[str, Any]] | None = None
                    ) -> float | None:
    """Mean over tasks of (merged score / the expert's score on the same task), on each task's primary metric."""
    primary = primary or {}
    ratios = []
    for t in metrics:
        mine, theirs = primary_value(metrics, primary, t), primary_value(individual, primary, t)
        if mine is not None and theirs:
            ratios.append(mine / theirs)
    return sum(ratios) / len(ratios) if ratios else None


TOP_LEVEL_SECTIONS = ("method", "preferences", POOL_SECTION, "bn_stats")


def check_sections(config: dict[str, Any], path: str | Path | None, methods: Iterable[str]) -> None:
    """Every top-level key of the config file is `method`, `preferences`, `modelpool` or an installed method: a typo
    (`mehtod:`, `tiez:`, `modelpol:`) would otherwise be ignored and the run would use defaults."""
    import difflib

    known = [*TOP_LEVEL_SECTIONS, *methods]
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"config file {str(path)!r}: unknown section {key!r}.{hint} Sections are `method:` "
                              f"(every selected method), `preferences:`, `modelpool:` (pool parameters), or a "
                              f"method's name (see `mergebench list`)")


def check_device(device: torch.device) -> None:
    """A device this machine has, before any work (not three failed cells later)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: this machine has no CUDA GPU that torch can use (torch "
                              f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), numbered from "
                              f"0")
    elif device.type not in ("cpu", "mps"):
        raise ConfigError(f"--device {device}: use cpu, cuda or cuda:N")


def check_scores(pool: ModelPool, taskpool: TaskPool) -> None:
    """The task pool must score the pool's experts on their own tasks: a task pool of other tasks (`--taskpool`
    naming another suite) would fail later inside a model with a shape error."""
    if pool.relation != "finetuned":
        return
    missing = [pool.task_of(e) for e in pool.expert_names if pool.task_of(e) not in taskpool.tasks]
    if missing:
        raise ConfigError(f"task pool {taskpool.name!r} cannot score model pool {pool.name!r}: it has no task "
                          f"{', '.join(repr(t) for t in missing)} (its tasks: {', '.join(taskpool.tasks)}). Drop "
                          f"--taskpool to use the pool's own ({pool.default_taskpool}), or name a task pool with "
                          f"these tasks")


class NonFiniteResult(MergebenchError):
    """A method produced NaN or infinite weights; the cell fails instead of storing a meaningless score."""


def check_finite_weights(evaluable: Any) -> None:
    """Refuse a merged model (or ensemble, or per-task models) with a non-finite weight, naming the tensor."""
    if isinstance(evaluable, Ensemble):
        models = dict(enumerate(evaluable.models))
    elif isinstance(evaluable, PerTaskModels):
        models = dict(evaluable.models)
    else:
        models = {"": evaluable}
    for where, model in models.items():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                place = f" (model {where})" if where != "" else ""
                raise NonFiniteResult(f"the method produced non-finite weights: {name}{place} has {bad} NaN or "
                                      f"infinite entries of {tensor.numel()}")


class GridProgress:
    """One log line per finished row, readable in a log file: count, outcome, elapsed time and an estimate of the
    time left (the mean time per row so far, times the rows left)."""

    def __init__(self, total: int):
        self.total, self.count, self.start = total, 0, time.monotonic()

    def done(self, label: str, result: CellResult) -> None:
        self.count += 1
        elapsed = time.monotonic() - self.start
        left = elapsed / self.count * (self.total - self.count)
        outcome = "ok" if result.status == "ok" else f"FAILED ({result.error})"
        score = f", avg {100 * result.mean:.1f}" if result.mean is not None else ""
        log.info("[%d/%d] %s: %s%s; elapsed %s, about %s left", self.count, self.total, label, outcome, score,
                 _duration(elapsed), _duration(left))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def group_reasons(lines: Sequence[str]) -> list[str]:
    """'a on p: why' and 'b on p: why' -> 'a, b on p: why', in first-seen order, each line once."""
    grouped: dict[str, list[str]] = {}
    for line in lines:
        method, _, rest = line.partition(" on ")
        names = grouped.setdefault(rest, [])
        if method not in names:
            names.append(method)
    return [f"{', '.join(names)} on {rest}" for rest, names in grouped.items()]


def _code_version(reg: Registration) -> str:
    return f"{reg.distribution or reg.plugin}=={reg.version}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return value
