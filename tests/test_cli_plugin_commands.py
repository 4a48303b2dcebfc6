"""Plugin commands (hook `register_commands`): a command registered by a plugin runs through `main` with its own
options, exit status and errors; a plugin whose hook or options fail, two plugins with one name, and a plugin taking
a core command's name are reported by `mergebench list` and never take the command line down."""

from __future__ import annotations

import subprocess
import sys
import types
from importlib import metadata

import pytest

from mergebench_core import ConfigError, hookimpl
from mergebench_core.cli import main
from mergebench_core.contract import registry as registry_module


def plugin(name: str, **hooks) -> types.ModuleType:
    """A plugin module with the given hook implementations."""
    module = types.ModuleType(name)
    for hook, impl in hooks.items():
        setattr(module, hook, hookimpl(impl))
    return module


def greeting_arguments(parser):
    parser.add_argument("who")
    parser.add_argument("--times", type=int, default=1)


def greet(args):
    """Greets someone, several times over if asked."""
    if args.times < 1:
        raise ConfigError(f"--times {args.times}: give at least 1")
    print(" ".join([f"hello {args.who}"] * args.times))
    return 3 if args.who == "nobody" else None


def registers_greet(register):
    register("greet", greet, arguments=greeting_arguments)


@pytest.fixture()
def use_plugins(monkeypatch):
    """Installs plugin modules as if they were entry points of distributions named after them (each loaded in
    isolation, as installed plugins are), and no other plugin."""

    def install(*modules: types.ModuleType) -> registry_module.Registry:
        points = []
        for module in modules:
            monkeypatch.setitem(sys.modules, module.__name__, module)
            points.append(metadata.EntryPoint(module.__name__, module.__name__, "mergebench"))
        registry = registry_module.build_registry(entry_points=points)
        monkeypatch.setattr(registry_module, "_REGISTRY", registry)
        return registry

    return install


def test_a_plugin_command_runs_through_main_with_its_options(use_plugins, capsys):
    use_plugins(plugin("greeter", register_commands=registers_greet))
    assert main(["greet", "world", "--times", "2"]) == 0
    assert capsys.readouterr().out == "hello world hello world\n"
    assert main(["greet", "nobody"]) == 3  # its return value is the exit status
    assert main(["greet", "world", "--times", "0"]) == 2  # a MergebenchError is one `error:` line
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --times 0: give at least 1"
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "Greets someone, several times over if asked." in capsys.readouterr().out  # help from run's docstring
    with pytest.raises(SystemExit) as exit_:
        main(["greet"])  # its own options are checked by argparse like a core command's
    assert exit_.value.code == 2 and "the following arguments are required: who" in capsys.readouterr().err


def test_list_shows_plugin_commands(use_plugins, capsys):
    use_plugins(plugin("greeter", register_commands=registers_greet))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "Commands:" in out and "Greets someone" in out.split("Commands:")[1]


def raises(register):
    raise RuntimeError("no commands today")


def test_a_raising_command_hook_is_a_broken_plugin(use_plugins, capsys):
    use_plugins(plugin("fragile", register_commands=raises), plugin("greeter", register_commands=registers_greet))
    assert main(["greet", "world"]) == 0  # the other plugin's command still runs
    assert capsys.readouterr().out == "hello world\n"
    assert main(["list"]) == 1
    out = capsys.readouterr().out
    assert "Broken plugins" in out and "fragile" in out and "RuntimeError: no commands today" in out


def test_options_that_fail_to_build_leave_the_command_line_up(use_plugins, capsys):
    def bad_arguments(parser):
        parser.add_argument("--x")
        parser.add_argument("--x")  # argparse refuses a second --x

    def registers(register):
        register("shaky", greet, arguments=bad_arguments)

    use_plugins(plugin("shaky_plugin", register_commands=registers),
                plugin("greeter", register_commands=registers_greet))
    assert main(["greet", "world"]) == 0
    assert main(["shaky", "--x", "1", "--help"]) == 2  # every word reaches the explanation, --help too
    err = capsys.readouterr().err
    assert "error: plugin 'shaky_plugin'" in err and "command 'shaky' failed while adding its options" in err
    assert "conflicting option string: --x" in err
    assert main(["list"]) == 1
    out = capsys.readouterr().out
    assert "Broken plugins" in out.split("Commands:")[1] and "command 'shaky' failed" in out


def test_two_plugins_with_one_command_name_are_a_clear_error(use_plugins, capsys):
    use_plugins(plugin("greeter_a", register_commands=registers_greet),
                plugin("greeter_b", register_commands=registers_greet))
    assert main(["greet", "world"]) == 2
    err = capsys.readouterr().err
    assert "command 'greet' is registered by several plugins (greeter_a, greeter_b)" in err
    assert "uninstall all but one" in err
    assert main(["list"]) == 0
    assert "command 'greet': greeter_a, greeter_b" in capsys.readouterr().out


def test_a_plugin_cannot_replace_a_core_command(use_plugins, capsys, caplog, tmp_path):
    def registers(register):
        register("leaderboard", greet, arguments=greeting_arguments)

    use_plugins(plugin("usurper", register_commands=registers))
    with pytest.raises(SystemExit):
        main(["--help"])
    assert any("registers the command 'leaderboard', which is a core command" in r.getMessage()
               for r in caplog.records)
    assert main(["leaderboard", "--store", str(tmp_path / "none.sqlite")]) == 2  # the core's runs
    assert "no results store" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "is a core command" in capsys.readouterr().out.split("Name conflicts")[1]


@pytest.mark.parametrize("call, message", [
    (lambda register: register("Greet Me", greet), "a command name is lower-case letters"),
    (lambda register: register("greet", "not a function"), "`run` must be a function"),
    (lambda register: register("greet", greet, arguments=3), "`arguments` must be a function"),
])
def test_bad_registrations_are_the_plugins_error(use_plugins, capsys, call, message):
    registry = use_plugins(plugin("careless", register_commands=call))
    assert not registry.commands and message in registry.broken[0].error


def test_core_commands_do_not_load_plugins(monkeypatch, tmp_path, capsys):
    def no_plugins(*args, **kwargs):
        raise AssertionError("plugins loaded")

    monkeypatch.setattr(registry_module, "get_registry", no_plugins)
    assert main(["-q", "leaderboard", "--store", str(tmp_path / "none.sqlite")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_the_installed_mergeability_plugin_adds_its_command():
    """Through the module entry (`python -m mergebench_core.cli`) and the installed plugin's entry point."""
    proc = subprocess.run([sys.executable, "-m", "mergebench_core.cli", "mergeability", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: mergebench mergeability") and "--recipes" in proc.stdout
