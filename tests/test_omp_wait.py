"""raysemi sets libgomp's wait policy to passive before torch loads, unless the user chose one."""

import os
import subprocess
import sys

PROBE = "import raysemi, os, torch; print(os.environ['OMP_WAIT_POLICY'])"


def run_probe(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_passive_by_default() -> None:
    assert run_probe(None) == "PASSIVE"


def test_user_choice_is_kept() -> None:
    assert run_probe("ACTIVE") == "ACTIVE"
