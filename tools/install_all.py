"""Install mergebench and the distributions in this repository, in one pip call.

By default: the core, every method plugin and the pools that run offline on any machine (the embedded digits
pools) — the main job's needs, without the CLIP and text pools' transformers/datasets stack. `--all` adds every
distribution marked optional (`[tool.mergebench] optional = true` in its pyproject.toml). Installs are editable
unless `--no-editable` (CI installs wheels). New distributions under plugins/, modelpools/ or taskpools/ are picked
up without editing any list. Any other argument is passed to pip.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("plugins", "modelpools", "taskpools")


def is_optional(dist: Path) -> bool:
    data = tomllib.loads((dist / "pyproject.toml").read_text())
    return bool(data.get("tool", {}).get("mergebench", {}).get("optional", False))


def distributions(include_optional: bool = False) -> list[Path]:
    found = [ROOT]
    for family in FAMILIES:
        for dist in sorted(p.parent for p in (ROOT / family).glob("*/pyproject.toml")):
            if include_optional or not is_optional(dist):
                found.append(dist)
    return found


def main(argv: list[str]) -> int:
    everything = "--all" in argv
    editable = "--no-editable" not in argv
    passed = [a for a in argv if a not in ("--all", "--no-editable")]
    args = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *passed]
    for dist in distributions(everything):
        args += ["-e", str(dist)] if editable else [str(dist)]
    return subprocess.call(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
