"""Waiting OpenMP threads sleep instead of spinning, unless the user chose otherwise (bench/training_under_load.py
measures why: spinning threads on a loaded machine made training steps 10-90x slower)."""

import os
import subprocess
import sys

PROBE = "import mergebench_core, os, torch; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy_after_import(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_importing_the_core_sets_a_passive_wait_policy_before_torch_loads():
    assert _policy_after_import() == "PASSIVE"


def test_a_users_own_wait_policy_is_kept():
    assert _policy_after_import(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
