"""Discovery of plugins through the `mergebench` entry-point group, and lookup of what they register.

Entry points are loaded once, lazily, each in isolation: a plugin that fails to import is recorded as broken (with
its error, shown by `mergebench list`) and does not take the others down, whatever it raises at import (`sys.exit`
included; only Ctrl-C goes through). `MERGEBENCH_PLUGINS=a,b` restricts loading to the named entry points or
distributions, for tests and reproducible runs: name the pool plugins too. `MERGEBENCH_METHODS=x,y` keeps only those
methods and leaves every pool, task pool and logger in place.
"""

from __future__ import annotations

import inspect
import logging
import os
import traceback
from dataclasses import dataclass, field, is_dataclass
from importlib import metadata
from typing import Any

import pluggy

import mergebench_core.contract.hookspecs as hookspecs
from mergebench_core.contract.api import Method, Registration
from mergebench_core.contract.commands import make_command
from mergebench_core.errors import PluginError, UnknownNameError, normalize_name

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "mergebench"
PLUGINS_ENV = "MERGEBENCH_PLUGINS"
METHODS_ENV = "MERGEBENCH_METHODS"


@dataclass(frozen=True)
class BrokenPlugin:
    name: str
    distribution: str
    error: str


@dataclass
class Registry:
    """Everything the installed plugins provide, by kind and name."""

    methods: dict[str, Registration] = field(default_factory=dict)
    modelpools: dict[str, Registration] = field(default_factory=dict)
    taskpools: dict[str, Registration] = field(default_factory=dict)
    loggers: dict[str, Registration] = field(default_factory=dict)
    commands: dict[str, Registration] = field(default_factory=dict)
    """Subcommands of `mergebench` (hook `register_commands`); `obj` is a `contract.commands.Command`."""
    broken: list[BrokenPlugin] = field(default_factory=list)
    plugins: list[tuple[str, str, str]] = field(default_factory=list)
    """(entry point name, distribution, version) of every plugin that loaded."""
    conflicts: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    """(kind, name) -> the distributions that all registered it; such names cannot be used until one is removed."""
    method_filter: frozenset[str] | None = None
    """The method names `MERGEBENCH_METHODS` keeps (None: every method)."""

    def method(self, name: str) -> type[Method]:
        return self._lookup("method", self.methods, normalize_name(name)).obj

    def modelpool(self, name: str) -> Registration:
        return self._lookup("model pool", self.modelpools, name)

    def taskpool(self, name: str) -> Registration:
        return self._lookup("task pool", self.taskpools, name)

    def logger(self, name: str) -> Registration:
        return self._lookup("logger", self.loggers, name)

    def command(self, name: str) -> Registration:
        return self._lookup("command", self.commands, name)

    def method_registration(self, name: str) -> Registration:
        return self._lookup("method", self.methods, normalize_name(name))

    def conflict_lines(self, kind: str = "method") -> list[str]:
        """'NAME on every pool: ...' for each conflicted name of `kind`, for a run's "not run" section: a plain
        `mergebench run` lists these instead of leaving the name out silently."""
        return [f"{name} on every pool: the name is registered by {len(dists)} plugins ({', '.join(sorted(dists))}); "
                f"uninstall all but one to use it" for (k, name), dists in sorted(self.conflicts.items()) if k == kind]

    def _lookup(self, kind: str, table: dict[str, Registration], name: str) -> Registration:
        for (_, conflicted), dists in self.conflicts.items():
            if conflicted == name:
                raise PluginError(f"{kind} {name!r} is registered by several plugins ({', '.join(dists)}); "
                                  f"uninstall all but one of them, or set {PLUGINS_ENV} to the plugins to load, the "
                                  f"pool plugins included.")
        if name in table:
            return table[name]
        folded = {k.lower(): k for k in table}
        if name.lower() in folded:
            return table[folded[name.lower()]]
        broken = "".join(f"\n  (plugin {b.name!r} from {b.distribution} failed to load: {b.error.splitlines()[-1]})"
                         for b in self.broken)
        if kind == "method" and self.method_filter is not None:
            broken += f"\n  ({METHODS_ENV}={','.join(sorted(self.method_filter))} keeps only those methods)"
        err = UnknownNameError(kind, name, table)
        if broken:
            err.args = (err.args[0] + broken,)
        raise err

    # -- registration -----------------------------------------------------------------------------------------
    def add(self, reg: Registration) -> None:
        if reg.kind == "method" and self.method_filter is not None and reg.name not in self.method_filter:
            return
        table = {"method": self.methods, "modelpool": self.modelpools, "taskpool": self.taskpools,
                 "logger": self.loggers, "command": self.commands}[reg.kind]
        key = (reg.kind, reg.name)
        if key in self.conflicts:
            self.conflicts[key].append(reg.distribution or reg.plugin)
        elif reg.name in table:  # a collision is an error, never a silent override
            other = table.pop(reg.name)
            self.conflicts[key] = [other.distribution or other.plugin, reg.distribution or reg.plugin]
            log.error("%s %r is registered by both %s and %s", reg.kind, reg.name, *self.conflicts[key])
        else:
            table[reg.name] = reg


def _validate_method(cls: Any, plugin: str) -> type[Method]:
    if not (inspect.isclass(cls) and issubclass(cls, Method)):
        raise PluginError(f"plugin {plugin!r} registered {cls!r}, which is not a mergebench_core.Method subclass")
    if not getattr(cls, "name", None):
        raise PluginError(f"plugin {plugin!r}: method class {cls.__name__} has no `name`")
    if not is_dataclass(getattr(cls, "Params", None)):
        raise PluginError(f"plugin {plugin!r}: method {cls.name!r} needs a `Params` dataclass")
    return cls


def _validate_pool_params(params: Any, kind: str, name: str, plugin: str) -> None:
    """A pool's parameters are a dataclass whose defaults build the pool as registered: checked at registration, so a
    plugin's mistake is reported as its own (a broken plugin), not as a user's bad pool name later."""
    if kind not in ("modelpool", "taskpool"):
        raise PluginError(f"plugin {plugin!r}: {kind} {name!r} was registered with params; only model pools and "
                          f"task pools take parameters")
    if not (inspect.isclass(params) and is_dataclass(params)):
        raise PluginError(f"plugin {plugin!r}: the params of model pool {name!r} must be a dataclass type, got "
                          f"{params!r}")
    try:
        params()
    except Exception as exc:  # noqa: BLE001 - whatever the plugin's dataclass raises is the plugin's error
        raise PluginError(f"plugin {plugin!r}: the params of model pool {name!r} need a default for every field "
                          f"({type(exc).__name__}: {exc})") from None


def build_registry(entry_points: list[metadata.EntryPoint] | None = None,
                   extra_modules: list[Any] | None = None) -> Registry:
    """Load plugins and collect what they register. `extra_modules` (tests) are registered as plugins too."""
    if entry_points is None:
        entry_points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    wanted = os.environ.get(PLUGINS_ENV)
    wanted_set = {w.strip() for w in wanted.split(",") if w.strip()} if wanted else None
    methods = os.environ.get(METHODS_ENV)
    method_filter = frozenset(normalize_name(m.strip()) for m in methods.split(",") if m.strip()) if methods else None

    registry = Registry(method_filter=method_filter)
    seen: set[tuple[str, str]] = set()
    for ep in sorted(entry_points, key=lambda e: e.name):
        dist = ep.dist.name if ep.dist else ""
        version = ep.dist.version if ep.dist else ""
        if (ep.name, dist or ep.value) in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add((ep.name, dist or ep.value))
        if wanted_set is not None and ep.name not in wanted_set and dist not in wanted_set:
            continue
        try:
            module = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin (even one calling sys.exit) must not take the others down
            _broken(registry, ep.name, dist, "failed to load", exc)
            continue
        try:
            _collect(registry, module, ep.name, dist, version)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            _broken(registry, ep.name, dist, "failed while registering", exc)
            continue
        registry.plugins.append((ep.name, dist, version))
    for module in extra_modules or []:
        _collect(registry, module, module.__name__, module.__name__, "")
        registry.plugins.append((module.__name__, module.__name__, ""))
    return registry


def _broken(registry: Registry, plugin: str, dist: str, what: str, exc: BaseException) -> None:
    if isinstance(exc, SystemExit):
        error = f"SystemExit: the plugin called sys.exit({exc.code!r}) while being imported or registering"
    else:
        error = "".join(traceback.format_exception_only(exc)).strip()
    log.warning("plugin %s (%s) %s: %s", plugin, dist, what, error)
    registry.broken.append(BrokenPlugin(plugin, dist, error))


def _collect(registry: Registry, module: Any, plugin: str, dist: str, version: str) -> None:
    pm = pluggy.PluginManager("mergebench")
    pm.add_hookspecs(hookspecs)
    pm.register(module, name=plugin)
    pending: list[Registration] = []

    def register_method(cls: type) -> None:
        cls = _validate_method(cls, plugin)
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        pending.append(Registration(normalize_name(cls.name), cls, "method", doc, plugin, dist, version))

    def pool_registrar(kind: str):
        def register(name: str, factory: Any, description: str = "", default: bool = False,
                     params: type | None = None) -> None:
            if not callable(factory):
                raise PluginError(f"plugin {plugin!r}: the factory for {kind} {name!r} is not callable")
            if params is not None:
                _validate_pool_params(params, kind, name, plugin)
            pending.append(Registration(name, factory, kind, description, plugin, dist, version, default, params))
        return register

    pm.hook.register_methods(register=register_method)
    pm.hook.register_modelpools(register=pool_registrar("modelpool"))
    pm.hook.register_taskpools(register=pool_registrar("taskpool"))

    def register_logger(name: str, factory: Any, description: str = "") -> None:
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r}: the factory for logger {name!r} is not callable")
        pending.append(Registration(name, factory, "logger", description, plugin, dist, version))

    pm.hook.register_loggers(register=register_logger)

    def register_command(name: str, run: Any, arguments: Any = None, help: str = "") -> None:  # noqa: A002
        command = make_command(plugin, name, run, arguments, help)
        pending.append(Registration(name, command, "command", command.help, plugin, dist, version))

    pm.hook.register_commands(register=register_command)
    for reg in pending:  # all or nothing per plugin
        registry.add(reg)


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = build_registry()
    return _REGISTRY
