"""The README's task-pool example runs as written: registered from the README's code, its pool variant is stored
under its canonical name, and its `logits` survive the evaluation loop, autograd and torch.func (Fisher)."""

import re
import types
from pathlib import Path

import pytest

from mergebench_core import registry as registry_module
from mergebench_core.cli import main
from mergebench_core.results.store import ResultStore

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(title: str) -> str:
    """The code block that follows the README line `<!-- taskpool-example: TITLE -->`."""
    match = re.search(rf"<!-- taskpool-example: {re.escape(title)} -->\s*```\w*\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, f"README lacks the task-pool example block {title!r}"
    return match.group(1)


@pytest.fixture()
def toy_plugin(monkeypatch, tmp_path):
    module = types.ModuleType("mergebench_toy")
    code = compile(readme_block("mergebench_toy.py"), "README.md:mergebench_toy.py", "exec")
    exec(code, module.__dict__)  # noqa: S102 - the README's own example, the point of the test
    monkeypatch.setattr(registry_module, "_REGISTRY", registry_module.build_registry(extra_modules=[module]))
    monkeypatch.setenv("MERGEBENCH_STORE", str(tmp_path / "r.sqlite"))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return module


def test_readme_task_pool_example_runs(toy_plugin, tmp_path, capsys):
    assert main(["run", "-m", "task_arithmetic,fisher", "-p", "toy-linear,toy-linear(lr=0.1)"]) == 0
    rows = ResultStore(tmp_path / "r.sqlite").all()
    assert {r.modelpool for r in rows} == {"toy-linear", "toy-linear(lr=0.1)"}
    assert all(r.status == "ok" for r in rows)
    for pool in ("toy-linear", "toy-linear(lr=0.1)"):
        score = {r.method: r.mean for r in rows if r.modelpool == pool}
        assert score["individual"] > score["pretrained"] + 0.1, (pool, score)  # the experts learned their tasks
    main(["list"])
    assert "toy-linear: lr: float = 0.5, steps: int = 30" in capsys.readouterr().out
