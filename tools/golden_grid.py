"""The golden grid: every stored number of the default grids on the embedded pools, kept bit for bit.

A refactoring must not change a single stored number. This script runs the grids below into a fresh store and
writes, for each cell, its key and every number it stored, floats as exact hexadecimal. `tests/test_golden_grid.py`
runs the same grids and compares against `tests/data/golden_grid.json`.

    python tools/golden_grid.py --write     # after a change that is meant to change numbers (say why in the commit)
    python tools/golden_grid.py             # compare, print the differences
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden_grid.json"

GRIDS: tuple[tuple[str, ...], ...] = (
    (),  # every method on the default pool
    ("-p", "digits-mlp_seeds,digits-cnn_seeds,digits-vit_seeds"),  # every method on the fusion pools
)


def _exact(value: Any) -> Any:
    """Floats as exact hexadecimal (so equality is equality of bits), recursively."""
    if isinstance(value, float):
        return value.hex() if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _exact(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_exact(v) for v in value]
    return value


def fingerprint(store_path: Path) -> dict[str, Any]:
    """Every cell of a store by its key: what identifies it and every number it stored."""
    from mergebench_core.results.store import ResultStore

    store = ResultStore(store_path, readonly=True)
    try:
        cells = {}
        for row in store.all():
            cells[row.cell_key] = _exact({
                "kind": row.kind, "method": row.method, "params": row.params, "modelpool": row.modelpool,
                "taskpool": row.taskpool, "seed": row.seed, "preference": row.preference, "status": row.status,
                "metrics": row.metrics, "mean": row.mean, "normalized_mean": row.normalized_mean,
                "error": (row.error or "").splitlines()[0] if row.error else None,
            })
        return dict(sorted(cells.items()))
    finally:
        store.close()


def run_grids(workdir: Path) -> dict[str, Any]:
    """Run every grid into one fresh store under `workdir` and return its fingerprint."""
    store = workdir / "grid.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("MERGEBENCH_CACHE", str(workdir / "cache"))
    for grid in GRIDS:
        subprocess.run([sys.executable, "-m", "mergebench_core.cli", "run", "--store", str(store), *grid],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return fingerprint(store)


def differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """What differs, a line per cell: missing, new, or changed (with the fields that changed).

    Cells of a method the file has never seen are not differences: the guard is about numbers already recorded, and a
    new method's bits depend on the machine that first ran it (float sums differ across CPUs), so they are recorded
    with `--write` on the machine that checks, not carried in a plugin's commit."""
    lines = []
    known = {cell["method"] for cell in expected.values()}
    for key in sorted(expected.keys() | actual.keys()):
        if key not in actual:
            lines.append(f"missing {key}: {expected[key]['method']} on {expected[key]['modelpool']}")
        elif key not in expected and actual[key]["method"] not in known:
            continue
        elif key not in expected:
            lines.append(f"new {key}: {actual[key]['method']} on {actual[key]['modelpool']}")
        elif expected[key] != actual[key]:
            changed = sorted(f for f in expected[key] if expected[key][f] != actual[key].get(f))
            lines.append(f"changed {key}: {actual[key]['method']} on {actual[key]['modelpool']}: {', '.join(changed)}")
    return lines


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="mergebench-golden-") as tmp:
        actual = run_grids(Path(tmp))
    if "--write" in argv:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(actual)} cells to {GOLDEN.relative_to(ROOT)}")
        return 0
    diff = differences(json.loads(GOLDEN.read_text()), actual)
    print("\n".join(diff) if diff else f"all {len(actual)} cells identical")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
