"""Install mergebench and every plugin, pool and task pool in this repository (editable), in one pip call.

Used by tox and by the README's quick start; new distributions under plugins/, modelpools/ or taskpools/ are
picked up without editing any list.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("plugins", "modelpools", "taskpools")


def distributions() -> list[Path]:
    found = [ROOT]
    for family in FAMILIES:
        found += sorted(p.parent for p in (ROOT / family).glob("*/pyproject.toml"))
    return found


def main(argv: list[str]) -> int:
    args = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *argv]
    for dist in distributions():
        args += ["-e", str(dist)]
    return subprocess.call(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
