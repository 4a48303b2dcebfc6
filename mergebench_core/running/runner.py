"""Expands a selection into cells, runs each, and stores each result the moment it is known.

Everything that can be checked before work starts is checked first (names, parameters, pool construction, a task
pool for every method that reads data), so a typo fails in a second, not after an hour of merging. A cell that
raises is stored as failed, with its error and traceback, and the grid goes on.

The runner is the grid's driver: it resolves pools by name, plans cells and hands them to an executor. What it
delegates has its own module: the options (`options`), cells and what planning reports (`cells`), one row's run
(`cell_run`, run in workers), checks and scores of results (`checks`), progress lines (`progress`), and the data a
method may rely on (`data_needs`). Executors get what they run from the runner and never import it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mergebench_core.contract.api import PRETRAINED, ModelPool, Registration, TaskPool
from mergebench_core.contract.config import build_params, check_overrides_used, load_yaml, params_dict, parse_overrides
from mergebench_core.contract.registry import Registry, get_registry
from mergebench_core.engine.bn_stats import BnStats
from mergebench_core.engine.pool_sources import pool_source
from mergebench_core.engine.roles import Role, declared_roles, has_running_stats, model_roles
from mergebench_core.errors import ConfigError, MergebenchError
from mergebench_core.pools.params import POOL_TARGET, canonical_names, check_pool_settings, make_pool, pool_section
from mergebench_core.pools.views import PoolName, TaskSubsetModelPool, TaskSubsetTaskPool
from mergebench_core.preferences.vectors import from_config
from mergebench_core.results.store import CellResult, ResultStore, cell_key
from mergebench_core.running.cell_run import (  # noqa: F401
    code_version,
    environment_versions,
    method_blank,
    reference_blank,
    run_method,
    run_reference,
    seeded_pool,
)
from mergebench_core.running.cells import (  # noqa: F401
    TOP_LEVEL_SECTIONS,
    Cell,
    RunReport,
    cell_from_spec,
    check_sections,
    group_reasons,
)
from mergebench_core.running.checks import (  # noqa: F401
    NonFiniteResult,
    check_finite_weights,
    check_scores,
    normalized_mean,
    primary_mean,
)
from mergebench_core.running.data_needs import missing_task_pool, needs_data, require_task_pool
from mergebench_core.running.executors import ForkExecutor, InProcessExecutor, Job
from mergebench_core.running.loggers import LoggerSet
from mergebench_core.running.options import (  # noqa: F401
    RunOptions,
    check_device,
    check_execution,
    resolve_device,
    runs_in_process,
)
from mergebench_core.running.progress import GridProgress
from mergebench_core.running.task_order import with_orders
from mergebench_core.training.methods import DerivedModelPool, MissingTrainedModel, TrainedModelCache, TrainingMethod

log = logging.getLogger(__name__)


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
        self.bn_stats = BnStats.parse(options.bn_stats)
        """The run's rule for batch-norm running statistics (the config file's `bn_stats:` applies in `plan`)."""
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
        configs = build_params(reg.name, method_cls.Params, None, [
            o for o in parse_overrides([f"{reg.name}.{p}" for p in parsed.params])])
        if len(configs) != 1:
            raise ConfigError(f"pool {parsed.unrestricted!r}: a derived pool takes one value per parameter")
        reason = method_cls.refusal(base, configs[0])
        if reason:
            raise ConfigError(f"pool {parsed.unrestricted!r} cannot be derived: {reg.name} cannot run on "
                              f"{base.name}: {reason}")
        name = self._base_taskpool(base)
        taskpool = require_task_pool(method_cls, self.taskpool(name) if name else None,
                                     where=f"to derive pool {parsed.unrestricted!r} from", fix=self._taskpool_fix(base))
        return DerivedModelPool(base, taskpool, method_cls(configs[0]), name=parsed.unrestricted,
                                cache=self.trained, code_version=code_version(reg), device=self.device,
                                eval_only=self.options.eval_only, loggers=self.loggers())

    def taskpool(self, name: str) -> TaskPool:
        if name not in self._taskpools:
            parsed = PoolName.parse(name)
            if parsed.tasks is not None:
                pool: TaskPool = TaskSubsetTaskPool(self.taskpool(parsed.unrestricted), parsed.tasks, name)
            else:  # a plain task pool, with its parameters if it declares any (`lmeval(tasks=...)`)
                pool = make_pool(self.registry.taskpool(parsed.base), parsed)
                pool.configure(dtype=self.options.dtype, trust_pickle=self.options.trust_pickle)
            self._taskpools[name] = pool
        return self._taskpools[name]

    def _base_taskpool(self, pool: ModelPool) -> str | None:
        """The task pool that scores `pool` (`--taskpool`, else the pool's default); None when neither names one."""
        if self.options.taskpool:
            parsed = PoolName.parse(self.options.taskpool)
            name = self.registry.taskpool(parsed.base).name
            return self.taskpool(PoolName(name, base_params=parsed.base_params).pool).name if parsed.base_params \
                else name
        return self.registry.taskpool(pool.default_taskpool).name if pool.default_taskpool else None

    def _taskpool_fix(self, pool: ModelPool) -> str:
        installed = ", ".join(sorted(self.registry.taskpools)) or "none installed"
        return f"model pool {pool.name!r} names no default task pool; pass --taskpool NAME (installed: {installed})"

    def taskpool_for(self, modelpool: str) -> str:
        """The task pool that scores `modelpool`, restricted to the same tasks when the model pool is."""
        parsed = PoolName.parse(modelpool)
        pool = self.modelpool(parsed.unrestricted)
        base = self._base_taskpool(pool)
        if base is None:
            raise MergebenchError(f"{self._taskpool_fix(pool)}: without one its models cannot be scored")
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
        tasks, preferences, applicability, a task pool for methods that read data, cached models for --eval-only,
        and resources."""
        opts = self.options
        explicit = bool(opts.methods)
        check_device(self.device)
        check_execution(opts)
        if opts.limit is not None and opts.limit < 1:
            raise ConfigError(f"--limit {opts.limit}: score at least one example per task (or drop --limit)")
        if opts.batch_size < 1:
            raise ConfigError(f"--batch-size {opts.batch_size}: a batch holds at least one example")
        method_names = list(opts.methods) if opts.methods else sorted(self.registry.methods)
        regs = [self.registry.method_registration(m) for m in method_names]
        if not explicit:  # methods that ask to be named are listed under "not run", with their reason
            self.not_applicable += [f"{r.name} on every pool: {r.obj.info.left_out_of_sweeps}; name it with --method to run it"
                                    for r in regs if r.obj.info.left_out_of_sweeps]
            regs = [r for r in regs if not r.obj.info.left_out_of_sweeps]
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
            self.bn_stats = BnStats.parse(opts.bn_stats or str(configured))
        preferences = opts.preferences
        if "preferences" in yaml_cfg:
            preferences = preferences + from_config(yaml_cfg.pop("preferences"))
        check_overrides_used(overrides, {r.name: r.obj.Params for r in regs})
        cells, refused = [], []
        ignoring: set[str] = set()
        for pool_name in pool_names:
            pool = self.modelpool(pool_name)
            self.check_data(pool_name, [r.obj for r in regs])
            taskpool_name = self.taskpool_for(pool_name)
            tasks = self.taskpool(taskpool_name).tasks
            check_scores(pool, self.taskpool(taskpool_name))
            prefs = preferences.expand(tasks) if preferences else []
            for reg in regs:
                for params in build_params(reg.name, reg.obj.Params, yaml_cfg, overrides):
                    reason = reg.obj.refusal(pool, params)
                    if reason:  # named: refused before any work; swept over: listed under "not run"
                        (refused if explicit else self.not_applicable).append(f"{reg.name} on {pool_name}: {reason}")
                        continue
                    aware = reg.obj.info.preference_aware
                    if prefs and not aware:
                        ignoring.add(reg.name)
                    for pref in (prefs if aware and prefs else [None]):
                        for seed in opts.seeds:
                            cells.append(Cell(reg.name, reg.obj, reg, params, pool_name, taskpool_name, seed, pref))
        if refused:
            listing = "".join(f"\n  - {r}" for r in refused)
            raise ConfigError("these methods cannot run on the selected pools:" + listing)
        if not explicit:  # a conflicted method name is unusable: say so rather than leave it out silently
            self.not_applicable += self.registry.conflict_lines("method")
        self.not_applicable = group_reasons(self.not_applicable)
        cells = with_orders(cells, opts.task_orders)  # continual methods: once per task order
        if ignoring:
            self.notes.append(f"preferences apply only to preference-aware methods; {', '.join(sorted(ignoring))} "
                              f"ignore them and ran once per pool")
        self.check_resources(dict.fromkeys((c.modelpool, c.taskpool) for c in cells))
        if opts.eval_only:
            self.check_trained(cells)
        self.check_builds(cells)
        return cells

    def check_builds(self, cells: Sequence[Cell]) -> None:
        """Build every plain pool the cells use (for each cell seed a pool draws per seed) now, in the planning
        process: a pool that cannot build is one refusal before any cell, not the same failing build retried and
        stored once per reference row and cell. Derived pools train in their cells and are not built here."""
        for pool_name, seed in dict.fromkeys((PoolName.parse(c.modelpool).pool, c.seed) for c in cells):
            pool = seeded_pool(self.modelpool(pool_name), seed)
            first = PRETRAINED if pool.has_pretrained else pool.expert_names[0]
            try:
                pool_source(pool, first)  # file pools build their folder and read one header; others load it
            except MergebenchError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever the pool's build raises, nothing may run on it
                log.debug("building %s failed", pool_name, exc_info=True)
                raise ConfigError(f"model pool {pool_name!r} (seed {seed}) cannot be built: {type(exc).__name__}: "
                                  f"{exc}. Nothing was run or stored. Check its parameters (`mergebench list` shows "
                                  f"each pool's parameters and bounds), or run again with -vv for the traceback") \
                    from exc

    def check_data(self, pool_name: str, methods: Sequence[type[Any]]) -> None:
        """The runner's guarantee (`running.data_needs`): every method that declares data gets a task pool on
        `pool_name`, or the run is refused here, before any work, naming the methods and how to give them one."""
        pool = self.modelpool(PoolName.parse(pool_name).unrestricted)
        readers = [m for m in methods if needs_data(m)]
        if readers and self._base_taskpool(pool) is None:
            raise missing_task_pool(readers, f"for model pool {pool_name!r}", self._taskpool_fix(pool))

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
                                        cache=self.trained, code_version=code_version(cell.registration)):
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

            # the workers rebuild each row from its spec with `run_spec`; the options carry the rule in force
            options = dataclasses.replace(opts, executor="local", bn_stats=self.bn_stats.name)
            store_path = str(self.store.path) if self.store is not None else None
            return RayExecutor(run_spec, (options, store_path), gpu=self.device.type == "cuda",
                               address=opts.ray_address, timeout=opts.cell_timeout)
        if runs_in_process(opts):
            return InProcessExecutor()
        return ForkExecutor(opts.jobs, opts.cell_timeout)

    def check_execution(self) -> None:
        check_execution(self.options)

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
                        self.options.limit, pref, self.identity(cell.modelpool, cell.taskpool, cell.registration),
                        task_order=cell.order)

    def identity(self, modelpool: str, taskpool: str, registration: Registration | None = None) -> dict[str, Any]:
        """The versions a cell's numbers depend on beyond its names: the plugin's, the pool's recipe or hub revisions,
        the task pool's. Part of the cell key: change any of them and the cell is computed again."""
        out: dict[str, Any] = {"modelpool": self.modelpool(modelpool).version_info(),
                               "taskpool": self.taskpool(taskpool).version_info()}
        if registration is not None:
            out["plugin"] = code_version(registration)
            if has_running_stats(self.pool_roles(modelpool)):  # only there: other pools' keys stay as they were
                out["bn_stats"] = self.bn_stats.name
        return out

    def pool_roles(self, modelpool: str) -> dict[str, Role]:
        """The tensor roles of a pool's models (`mergebench_core.engine.roles`), from its pretrained model and what
        the pool declares; computed once per pool. Pools without a pretrained model give only what they declare
        (loading a model of theirs may mean training it)."""
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
                blank = functools.partial(reference_blank, self, pool_name, taskpool_name, label, seed)
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

    def reference(self, pool_name: str, taskpool_name: str, label: str, seed: int = 0) -> CellResult:
        """Compute one reference row (in a worker)."""
        return run_reference(self, pool_name, taskpool_name, label, seed)

    def cell_job(self, cell: Cell) -> Job:
        return Job(cell.label, functools.partial(self.run_cell, cell), functools.partial(self._blank, cell),
                   spec=cell.spec())

    def _blank(self, cell: Cell) -> CellResult:
        return method_blank(self, cell)

    def run_cell(self, cell: Cell) -> CellResult:
        """Run one cell (in a worker) and return its row; its normalised score is the driver's to add."""
        return run_method(self, cell)

    def _normalized(self, result: CellResult) -> float | None:
        assert self.store is not None
        key = cell_key("reference", "individual", {}, result.modelpool, result.taskpool, 0, self.options.limit, None,
                       self.identity(result.modelpool, result.taskpool))
        ref = self.store.get(key)
        if ref is None or ref.status != "ok":
            return None
        return normalized_mean(result.metrics, ref.metrics, result.primary_metrics)


def run_spec(options: RunOptions, store_path: str | None, spec: Sequence[Any]) -> CellResult:
    """Compute a row from its description (`Job.spec`) with this process's plugins: what a Ray worker runs. The
    options are the driver's, with the rules it resolved (the batch-norm rule) written in."""
    runner = Runner(get_registry(), None, options)
    if store_path is not None:  # training curves go beside the store's path, on the worker's filesystem
        runner.logger_set.store_path = Path(store_path)
    if spec[0] == "reference":
        _, pool, taskpool, label, *seed = spec  # the seed: for pools whose models depend on it (`for_seed`)
        return runner.reference(pool, taskpool, label, *seed)
    return runner.run_cell(cell_from_spec(runner.registry, spec, runner.taskpool(spec[4]).tasks))
