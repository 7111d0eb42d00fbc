"""Every process a raysemi command starts is gone when it exits, also after a crash (SIGKILL, OOM).

Ray fate-shares its GCS and raylet with the driver that started them, but its dashboard and runtime-env agents
only notice the dead raylet, then block about 60 s trying to report it to the dead GCS before they exit (measured
on Ray 2.60: a ``--workers 2`` run whose driver was SIGKILLed left both agents for 62 s). So a command that starts
a local Ray also starts this reaper: a small process in its own session that notes the driver's descendants every
half second and, once the driver is gone, terminates those still alive (SIGTERM, then SIGKILL after a grace
period). A process is identified by its pid and start time, so a reused pid is never hit.

Run as a script (``python reaper.py DRIVER_PID``) so that it imports nothing of raysemi or torch. Linux only (it
reads ``/proc``); elsewhere ``start_reaper`` does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 2.0
_reaper: tuple[int, subprocess.Popen] | None = None  # (the pid it watches, the reaper)


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process /proc shows."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name (field 2) is in parentheses and may hold spaces: split after its last ')'
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(root: int, table: dict[int, tuple[int, int]]) -> set[tuple[int, int]]:
    """(pid, start time) of every process below ``root`` in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add((child, table[child][1]))
            stack.append(child)
    return found


def _alive(processes: set[tuple[int, int]], table: dict[int, tuple[int, int]] | None = None) -> set[tuple[int, int]]:
    table = _processes() if table is None else table
    return {(pid, start) for pid, start in processes if table.get(pid, (0, -1))[1] == start}


def _signal(processes: set[tuple[int, int]], signum: int) -> None:
    for pid, _ in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def watch(driver: int) -> None:
    """Note ``driver``'s descendants until it exits, then end those still alive."""
    start = _processes().get(driver, (0, None))[1]
    seen: set[tuple[int, int]] = set()
    while True:
        table = _processes()
        if table.get(driver, (0, None))[1] != start:
            break
        # keep every process ever seen: an agent whose parent (the raylet) died is re-parented out of the tree
        seen = _alive(seen, table) | {(pid, t) for pid, t in descendants(driver, table) if pid != os.getpid()}
        time.sleep(POLL_S)
    left = _alive(seen)
    _signal(left, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _alive(left)
    _signal(left, signal.SIGKILL)


def start_reaper() -> None:
    """Start the reaper for this process (once per process; Linux only). Its own session keeps it out of a
    Ctrl-C or a kill of the command's process group; closed standard streams keep it from holding a caller's pipe
    open."""
    global _reaper
    if (_reaper is not None and _reaper[0] == os.getpid() and _reaper[1].poll() is None) or not Path("/proc/self/stat").exists():
        return
    # -I -S: no script folder on sys.path (raysemi/engine's modules never shadow the standard library's), no site
    _reaper = os.getpid(), subprocess.Popen(
        [sys.executable, "-I", "-S", __file__, str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]))
