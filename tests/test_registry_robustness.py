"""Plugins that misbehave at import, and plugins that collide: installed as real distributions (dist-info folders on
sys.path, found through the `mergebench` entry-point group like any pip-installed plugin)."""

from __future__ import annotations

import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from mergebench_core import registry as registry_module
from mergebench_core.cli import main
from mergebench_core.errors import PluginError, UnknownNameError
from mergebench_core.contract.registry import build_registry
from mergebench_core.results.store import ResultStore

TINY_POOLS = '''
import torch
from torch import nn
from mergebench_core import ModelPool, TaskPool, hookimpl


class TinyPool(ModelPool):
    default_taskpool = "tiny_tasks"

    @property
    def expert_names(self):
        return ["t0", "t1"]

    def load_model(self, name):
        torch.manual_seed({"_pretrained_": 0, "t0": 1, "t1": 2}[name])
        return nn.Linear(2, 2)


class TinyTasks(TaskPool):
    @property
    def tasks(self):
        return ["t0", "t1"]

    def batches(self, task, split="test", *, batch_size=256, limit=None):
        yield torch.eye(2), torch.tensor([0, 1])

    def logits(self, model, task, inputs):
        return model(inputs)


@hookimpl
def register_modelpools(register):
    register("tiny", TinyPool, "two experts of nn.Linear(2, 2)")


@hookimpl
def register_taskpools(register):
    register("tiny_tasks", TinyTasks)
'''

TIES_FORK = '''
from dataclasses import dataclass
from mergebench_core import TensorMergeMethod, hookimpl


@dataclass
class Params:
    pass


class ForkedTies(TensorMergeMethod):
    """Someone's fork that took the same name."""
    name = "ties"
    Params = Params

    def merge_tensor(self, key, base, experts):
        return base


@hookimpl
def register_methods(register):
    register(ForkedTies)
'''


@pytest.fixture()
def site(tmp_path, monkeypatch):
    """A folder on sys.path where `install` puts plugin distributions; the CLI's registry is rebuilt from the real
    entry points plus these."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEBENCH_STORE", str(tmp_path / "results.sqlite"))
    monkeypatch.delenv("MERGEBENCH_PLUGINS", raising=False)
    monkeypatch.delenv("MERGEBENCH_METHODS", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    modules: list[str] = []

    def install(dist: str, module: str, source: str, entry_point: str | None = None) -> None:
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[mergebench]\n{entry_point or module} = {module}\n")
        modules.append(module)

    yield install
    for module in modules:
        sys.modules.pop(module, None)


def test_sys_exit_at_a_plugins_import_is_a_broken_plugin_and_run_still_works(site, tmp_path, capsys):
    site("mergebench-quitter", "quitter_plugin", "import sys\nsys.exit(0)\n")
    site("tiny-pools", "tiny_pools_plugin", TINY_POOLS)
    assert main(["list"]) == 1  # broken plugins make `list` exit 1, and it says which and why
    out = capsys.readouterr().out
    assert "Broken plugins (failed to load):" in out
    assert "quitter_plugin (mergebench-quitter): SystemExit: the plugin called sys.exit(0)" in out
    assert "task_arithmetic" in out and "tiny" in out  # everything else is there

    assert main(["run", "-m", "task_arithmetic", "-p", "tiny"]) == 0
    assert "| task_arithmetic" in capsys.readouterr().out
    rows = ResultStore(tmp_path / "results.sqlite", readonly=True).all()
    assert {r.method for r in rows} == {"pretrained", "individual", "task_arithmetic"}


def test_conflicting_names_are_listed_in_the_not_run_section_with_both_distributions(site, tmp_path, monkeypatch,
                                                                                     capsys):
    site("mergebench-ties-fork", "ties_fork_plugin", TIES_FORK, entry_point="ties")  # even the same entry point
    site("tiny-pools", "tiny_pools_plugin", TINY_POOLS)
    monkeypatch.setenv("MERGEBENCH_METHODS", "ties,task_arithmetic")
    assert main(["run", "-p", "tiny"]) == 0
    captured = capsys.readouterr()
    line = next(x for x in captured.err.splitlines() if x.startswith("(not run: ties on every pool"))
    assert "registered by 2 plugins (mergebench-ties, mergebench-ties-fork)" in line
    assert "| task_arithmetic" in captured.out and "| ties" not in captured.out
    assert {r.method for r in ResultStore(tmp_path / "results.sqlite", readonly=True).all()} == \
        {"pretrained", "individual", "task_arithmetic"}

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "Name conflicts (unusable until resolved):" in out
    assert "method 'ties': mergebench-ties, mergebench-ties-fork" in out or \
        "method 'ties': mergebench-ties-fork, mergebench-ties" in out

    assert main(["run", "-m", "ties", "-p", "tiny"]) == 2  # named: refused before any work, with the reason
    assert "'ties' is registered by several plugins" in capsys.readouterr().err


def test_methods_selector_keeps_every_pool(monkeypatch):
    monkeypatch.delenv("MERGEBENCH_PLUGINS", raising=False)
    monkeypatch.setenv("MERGEBENCH_METHODS", "task-arithmetic")  # hyphens work as everywhere
    reg = build_registry()
    assert list(reg.methods) == ["task_arithmetic"]
    assert reg.modelpools["digits-mlp_TA8"].default and "digits_TA8" in reg.taskpools
    with pytest.raises(UnknownNameError, match="MERGEBENCH_METHODS=task_arithmetic keeps only those methods"):
        reg.method("ties")


def test_plugins_selector_with_the_pool_plugin_named(monkeypatch):
    monkeypatch.delenv("MERGEBENCH_METHODS", raising=False)
    monkeypatch.setenv("MERGEBENCH_PLUGINS", "ties,digits")  # as the README says: name the pool plugin too
    reg = build_registry()
    assert list(reg.methods) == ["ties"] and "digits-mlp_TA8" in reg.modelpools


# -- in isolation, with entry points made by hand ---------------------------------------------------------------------

@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("MERGEBENCH_PLUGINS", raising=False)
    monkeypatch.delenv("MERGEBENCH_METHODS", raising=False)
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("robust_fake_")]:
        del sys.modules[name]


def _ep(folder, module, text):
    (folder / f"{module}.py").write_text(textwrap.dedent(text))
    return EntryPoint(module, module, "mergebench")


def test_every_kind_of_exit_at_import_or_registration_is_recorded(plugin_dir):
    eps = [
        _ep(plugin_dir, "robust_fake_exit1", "import sys\nsys.exit('no GPU here')\n"),
        _ep(plugin_dir, "robust_fake_base", "class Odd(BaseException): pass\nraise Odd('weird')\n"),
        _ep(plugin_dir, "robust_fake_hook", '''
            import sys
            from mergebench_core import hookimpl
            @hookimpl
            def register_methods(register):
                sys.exit(3)
            '''),
        _ep(plugin_dir, "robust_fake_pools", TINY_POOLS),
    ]
    reg = build_registry(eps)
    broken = {b.name: b.error for b in reg.broken}
    assert broken["robust_fake_exit1"].startswith("SystemExit: the plugin called sys.exit('no GPU here')")
    assert broken["robust_fake_base"] == "robust_fake_base.Odd: weird"
    assert "sys.exit(3)" in broken["robust_fake_hook"]
    assert "tiny" in reg.modelpools  # the others loaded


def test_ctrl_c_during_a_plugins_import_still_interrupts(plugin_dir):
    ep = _ep(plugin_dir, "robust_fake_interrupt", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        build_registry([ep])


def test_conflict_lines_and_the_named_lookup(plugin_dir):
    one = _ep(plugin_dir, "robust_fake_one", TIES_FORK)
    two = _ep(plugin_dir, "robust_fake_two", TIES_FORK)
    reg = build_registry([one, two])
    assert reg.conflict_lines() == [("ties on every pool: the name is registered by 2 plugins (robust_fake_one, "
                                     "robust_fake_two); uninstall all but one to use it")]
    assert reg.conflict_lines("modelpool") == []
    with pytest.raises(PluginError, match="MERGEBENCH_PLUGINS to the plugins to load, the pool plugins included"):
        reg.method("ties")
