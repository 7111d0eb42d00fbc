"""raysemi leaves libgomp's wait policy to the user. Forcing ``OMP_WAIT_POLICY=PASSIVE`` at import (``704b26c``)
made a 2-thread step 1.4-1.7x slower on an idle machine and beside low-priority work, and made a 1-worker
TorchTrainer look 1.4x slower than a plain loop that had loaded torch first (BENCHMARKS.md section 3)."""

import os
import subprocess
import sys

PROBE = "import raysemi, os, torch; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"


def run_probe(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_importing_raysemi_leaves_the_wait_policy_unset() -> None:
    assert run_probe(None) == "unset"


def test_a_policy_the_user_chose_is_kept() -> None:
    assert run_probe("PASSIVE") == "PASSIVE"
