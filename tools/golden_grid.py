"""The golden grid: every stored number of the default grids on the embedded pools, against a recorded run.

This script runs the grids below into a fresh store and records, for each cell, its key and every number it stored,
floats as exact hexadecimal, with the machine that made them. Two comparisons, because bits are only portable
between identical machines: the embedded pools train their experts on the CPU, and a different instruction set
(AVX-512 against AVX2, another MKL code path) changes the last bits of a matrix product, which a few hundred SGD
steps and a permutation search turn into a different prediction here and there (seen: up to 3.5 accuracy points
for git_rebasin and otfusion on the seed pools, 0.3 % of losses changing by more than a fifth).

- **exact** (`--exact`): every field bit for bit. The guard for a refactoring: record on main first
  (`--write`), refactor, compare on the same machine.
- **portable** (the default, and `tests/test_golden_grid.py` on any machine): the cell keys, statuses, parameters,
  errors and example counts exactly; every accuracy-like number (metrics other than `loss`, `mean`,
  `normalized_mean`) within `PORTABLE_ABS_TOL` (`SEARCH_ABS_TOL` for the alignment-by-search fusion methods);
  losses are not compared.

    python tools/golden_grid.py --write     # record this machine's numbers (say why in the commit)
    python tools/golden_grid.py [--exact]   # compare, print the differences
"""

from __future__ import annotations

import hashlib
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

PORTABLE_ABS_TOL = 0.05
"""Accuracy points (as a fraction) a number may move between machines: no other cell has moved by more than 0.015."""
SEARCH_ABS_TOL = 0.10
"""For the fusion methods that align neurons by a discrete search (a permutation or a clustering), where a near-tie
decided the other way moves a whole neuron: 0.035 seen (git_rebasin), 0.024 (otfusion)."""
SEARCH_METHODS = frozenset({"git_rebasin", "otfusion", "kf_fusion", "hf_fusion", "alf"})

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


def machine() -> dict[str, str]:
    """What decides the bits of a CPU run: torch's version and kernel level, and the processor's model and flags."""
    import platform

    import torch

    info = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["cpu"] = (f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} "
                   f"model {fields.get('model', '?')}")
    flags = " ".join(sorted(fields.get("flags", "").split()))
    info["cpu_flags_sha256"] = hashlib.sha256(flags.encode()).hexdigest()[:16]
    return info


def run_grids(workdir: Path) -> dict[str, Any]:
    """Run every grid into one fresh store under `workdir` and return its fingerprint."""
    store = workdir / "grid.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("MERGEBENCH_CACHE", str(workdir / "cache"))
    for grid in GRIDS:
        subprocess.run([sys.executable, "-m", "mergebench_core.cli", "run", "--store", str(store), *grid],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return fingerprint(store)


def _numbers(cell: dict[str, Any]) -> dict[tuple[str, ...], float]:
    """The cell's accuracy-like numbers by path (task, metric), losses left out; hex floats decoded."""
    out = {}
    for field in ("mean", "normalized_mean"):
        if isinstance(cell.get(field), str):
            out[(field,)] = float.fromhex(cell[field])
    for task, values in (cell.get("metrics") or {}).items():
        for name, value in (values.items() if isinstance(values, dict) else ()):
            if name != "loss" and name != "examples" and isinstance(value, str) and "0x" in value:
                out[("metrics", task, name)] = float.fromhex(value)
    return out


def _portable_changes(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """The fields of one cell that differ beyond what another machine explains."""
    changed = {f for f in expected if f not in ("metrics", "mean", "normalized_mean") and expected[f] != actual.get(f)}
    examples = {t: v.get("examples") for t, v in (expected.get("metrics") or {}).items() if isinstance(v, dict)}
    got = {t: v.get("examples") for t, v in (actual.get("metrics") or {}).items() if isinstance(v, dict)}
    if examples != got:
        changed.add("metrics")
    want, have = _numbers(expected), _numbers(actual)
    if want.keys() != have.keys():
        changed.add("metrics")
    tolerance = SEARCH_ABS_TOL if expected.get("method") in SEARCH_METHODS else PORTABLE_ABS_TOL
    for path in want.keys() & have.keys():
        a, b = want[path], have[path]
        if not (a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tolerance):
            changed.add(path[0])
    return sorted(changed)


def differences(expected: dict[str, Any], actual: dict[str, Any], exact: bool = False) -> list[str]:
    """What differs, a line per cell: missing, new, or changed (with the fields that changed).

    `exact` compares every bit; otherwise numbers may drift as far as another machine explains (module docstring).
    Cells of a method the file has never seen are not differences: the guard is about numbers already recorded, and a
    new method's cells are recorded with `--write`."""
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
            if exact:
                changed = sorted(f for f in expected[key] if expected[key][f] != actual[key].get(f))
            else:
                changed = _portable_changes(expected[key], actual[key])
            if changed:
                lines.append(f"changed {key}: {actual[key]['method']} on {actual[key]['modelpool']}: "
                             f"{', '.join(changed)}")
    return lines


def load() -> tuple[dict[str, str], dict[str, Any]]:
    """The recorded machine and cells."""
    recorded = json.loads(GOLDEN.read_text())
    return recorded["machine"], recorded["cells"]


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="mergebench-golden-") as tmp:
        actual = run_grids(Path(tmp))
    if "--write" in argv:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"machine": machine(), "cells": actual}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(actual)} cells to {GOLDEN.relative_to(ROOT)}")
        return 0
    recorded_on, expected = load()
    exact = "--exact" in argv
    if exact and recorded_on != machine():
        print(f"note: recorded on {recorded_on}, this is {machine()}: bits are expected to differ")
    diff = differences(expected, actual, exact=exact)
    drift = sum(1 for key in expected.keys() & actual.keys() if expected[key] != actual[key])
    print("\n".join(diff) if diff else f"all {len(actual)} cells agree ({'exact' if exact else 'portable'}); "
          f"{drift} differ in some bit")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
