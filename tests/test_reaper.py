"""The reaper ends what a crashed raysemi command left running (issue 17: after a SIGKILL, Ray's agents lingered
about 60 s), and only that."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from raysemi.engine.reaper import descendants

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the reaper reads /proc (Linux)")

# A driver that starts the reaper, then leaves what Ray's agents look like after a crash: a child that ignores
# SIGTERM, and a grandchild whose parent has exited (re-parented out of the driver's tree, like an agent whose
# raylet died). It writes their pids and waits to be killed, or exits by itself with ``exit``.
DRIVER = textwrap.dedent("""
    import json, subprocess, sys, time
    from raysemi.engine.reaper import start_reaper
    start_reaper()
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"],
                                stdout=subprocess.DEVNULL)
    middle = subprocess.Popen([sys.executable, "-c", "import subprocess, time; print(subprocess.Popen(['sleep', '300'], "
                               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid, flush=True); time.sleep(1.5)"],
                              stdout=subprocess.PIPE, text=True)
    orphan = int(middle.stdout.readline())
    middle.wait()  # the orphan's parent is gone, as an agent's raylet is after a crash
    time.sleep(1.5)  # the reaper notes the tree every 0.5 s
    print(json.dumps([stubborn.pid, orphan]), flush=True)
    if sys.argv[1] == "exit":
        sys.exit(0)
    time.sleep(300)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_what_a_dead_driver_left_is_ended(tmp_path: Path, how: str) -> None:
    bystander = subprocess.Popen(["sleep", "300"])  # not the driver's: must survive
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, how], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        left = json.loads(driver.stdout.readline())
        assert all(_alive(p) for p in left)
        if how == "sigkill":
            driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        # SIGTERM, 2 s of grace for the one that ignores it, then SIGKILL
        assert _wait_gone(left, 10.0) == [], "the crashed driver's processes are still running"
        assert _alive(bystander.pid)
    finally:
        for pid in [bystander.pid, *locals().get("left", [])]:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        bystander.wait()


def test_descendants_follow_the_whole_tree() -> None:
    table = {1: (0, 10), 2: (1, 20), 3: (2, 30), 4: (1, 40), 5: (99, 50)}
    assert descendants(1, table) == {(2, 20), (3, 30), (4, 40)}
    assert descendants(5, table) == set()
