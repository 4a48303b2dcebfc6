"""The README's plugin-command example runs as written: registered from the README's code, `mergebench sweep` prints
the log-spaced values its docstring promises and refuses a bad range with one error line."""

import re
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest

from mergebench_core.cli import main
from mergebench_core.contract import registry as registry_module

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(title: str) -> str:
    """The code block that follows the README line `<!-- command-example: TITLE -->`."""
    match = re.search(rf"<!-- command-example: {re.escape(title)} -->\s*```\w*\n(.*?)```", README.read_text(),
                      re.DOTALL)
    assert match, f"README lacks the command example block {title!r}"
    return match.group(1)


@pytest.fixture()
def sweep_plugin(monkeypatch):
    module = types.ModuleType("mergebench_sweep")
    exec(compile(readme_block("mergebench_sweep.py"), "README.md:mergebench_sweep.py", "exec"),  # noqa: S102
         module.__dict__)  # the README's own example, the point of the test
    monkeypatch.setitem(sys.modules, module.__name__, module)
    entry_point = metadata.EntryPoint("sweep", module.__name__, "mergebench")
    monkeypatch.setattr(registry_module, "_REGISTRY", registry_module.build_registry(entry_points=[entry_point]))
    return module


def test_readme_command_example_runs(sweep_plugin, capsys):
    assert main(["sweep", "ties.k", "--low", "0.01", "--high", "1", "--points", "3"]) == 0
    assert capsys.readouterr().out == "ties.k=0.01,0.1,1\n"  # the docstring's promise
    assert main(["sweep", "dare.p", "--low", "0.1", "--high", "0.9", "--points", "2"]) == 0
    assert capsys.readouterr().out == "dare.p=0.1,0.9\n"
    assert main(["sweep", "ties.k", "--low", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: ties.k: need 0 < --low < --high and --points >= 2"
    assert main(["list"]) == 0
    assert "Print METHOD.PARAM=v1,v2,... with log-spaced values" in capsys.readouterr().out
