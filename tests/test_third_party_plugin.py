"""A third party writes a plugin from the README alone, pip-installs it, and mergebench uses it unchanged."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mergebench_core.engine.tensors import load_state_dict, save_state_dict

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(title: str) -> str:
    """The code block that follows the README line `<!-- plugin-example: TITLE -->`."""
    text = README.read_text()
    match = re.search(rf"<!-- plugin-example: {re.escape(title)} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"README lacks the plugin example block {title!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    pkg = tmp_path_factory.mktemp("mergebench-median")
    (pkg / "pyproject.toml").write_text(readme_block("mergebench-median/pyproject.toml"))
    (pkg / "mergebench_median.py").write_text(readme_block("mergebench-median/mergebench_median.py"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", str(pkg)], check=True)
    yield pkg
    subprocess.run([*pip, "uninstall", "-y", "mergebench-median"], check=True)


def mergebench(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mergebench")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env)


def test_installed_plugin_is_listed_run_and_merges(installed_plugin, session_cache, tmp_path):
    env = dict(os.environ, MERGEBENCH_CACHE=str(session_cache), MERGEBENCH_STORE=str(tmp_path / "r.sqlite"))
    listed = mergebench("list", env=env)
    assert re.search(r"median\s+mergebench-median 0\.1\.0", listed.stdout), listed.stdout + listed.stderr

    ran = mergebench("run", "--method", "median", "--modelpool", "digits-mlp_TA8", env=env)
    assert ran.returncode == 0, ran.stderr
    assert "| median" in ran.stdout

    files = []
    for i, values in enumerate(([1.0, 5.0], [3.0, -1.0], [2.0, 2.0])):
        files.append(str(save_state_dict({"w": torch.tensor(values)}, tmp_path / f"e{i}.safetensors")))
    merged = mergebench("merge", "--method", "median", "--models", *files, "--out", str(tmp_path / "m.safetensors"),
                        env=env)
    assert merged.returncode == 0, merged.stderr
    assert torch.equal(load_state_dict(tmp_path / "m.safetensors")["w"], torch.tensor([2.0, 2.0]))


def test_readme_example_is_small():
    code_lines = [line for line in readme_block("mergebench-median/mergebench_median.py").splitlines() if line.strip()]
    assert len(code_lines) <= 22  # "a complete plugin in about 20 lines"
    pyproject = textwrap.dedent(readme_block("mergebench-median/pyproject.toml"))
    assert pyproject.count("[project.entry-points.mergebench]") == 1
