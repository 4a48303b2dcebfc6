import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from mergebench_core.errors import PluginError, UnknownNameError
from mergebench_core.contract.registry import build_registry

METHOD_MODULE = '''
from dataclasses import dataclass
from mergebench_core import Method, MergeOutput, hookimpl

@dataclass
class Params:
    alpha: float = 1.0

class {cls}(Method):
    """{doc}"""
    name = "{name}"
    Params = Params
    def run(self, pool, ctx):
        raise NotImplementedError

@hookimpl
def register_methods(register):
    register({cls})
'''


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("fakeplugin_")]:
        del sys.modules[name]


def write(plugin_dir, module, text):
    (plugin_dir / f"{module}.py").write_text(textwrap.dedent(text))
    return EntryPoint(module, module, "mergebench")


def test_lookup_suggests_close_names(plugin_dir):
    ep = write(plugin_dir, "fakeplugin_a", METHOD_MODULE.format(cls="A", name="dare_ties", doc="DARE."))
    reg = build_registry([ep])
    assert reg.method("dare-ties").name == "dare_ties"  # hyphens are underscores
    with pytest.raises(UnknownNameError, match="Did you mean 'dare_ties'"):
        reg.method("dare_tie")


def test_broken_plugin_is_reported_and_others_still_load(plugin_dir):
    good = write(plugin_dir, "fakeplugin_good", METHOD_MODULE.format(cls="G", name="good", doc="Good."))
    bad = write(plugin_dir, "fakeplugin_bad", "raise ImportError('needs a missing library')\n")
    reg = build_registry([good, bad])
    assert "good" in reg.methods
    assert [b.name for b in reg.broken] == ["fakeplugin_bad"]
    assert "needs a missing library" in reg.broken[0].error
    with pytest.raises(UnknownNameError, match="fakeplugin_bad"):
        reg.method("other")


def test_name_collision_is_an_error_not_an_override(plugin_dir):
    one = write(plugin_dir, "fakeplugin_one", METHOD_MODULE.format(cls="One", name="same", doc="One."))
    two = write(plugin_dir, "fakeplugin_two", METHOD_MODULE.format(cls="Two", name="same", doc="Two."))
    reg = build_registry([one, two])
    assert ("method", "same") in reg.conflicts
    with pytest.raises(PluginError, match="registered by several plugins"):
        reg.method("same")


def test_env_variable_selects_plugins(plugin_dir, monkeypatch):
    one = write(plugin_dir, "fakeplugin_x", METHOD_MODULE.format(cls="X", name="x", doc="X."))
    two = write(plugin_dir, "fakeplugin_y", METHOD_MODULE.format(cls="Y", name="y", doc="Y."))
    monkeypatch.setenv("MERGEBENCH_PLUGINS", "fakeplugin_y")
    assert list(build_registry([one, two]).methods) == ["y"]


def test_a_method_without_params_dataclass_is_rejected(plugin_dir):
    ep = write(plugin_dir, "fakeplugin_noparams", '''
        from mergebench_core import Method, hookimpl
        class M(Method):
            name = "m"
            def run(self, pool, ctx): ...
        @hookimpl
        def register_methods(register):
            register(M)
        ''')
    reg = build_registry([ep])
    assert reg.broken and "Params" in reg.broken[0].error


def test_installed_plugins_are_found():
    reg = build_registry()
    assert {"simple_average", "task_arithmetic", "ties"} <= set(reg.methods)
    assert reg.methods["ties"].distribution == "mergebench-ties"
    assert reg.modelpools["digits-mlp_TA8"].default
