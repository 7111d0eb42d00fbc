"""Listening TCP sockets of a process tree, read from /proc (Linux only): what a local Ray accepts from other hosts.

A socket belongs to every process holding a descriptor for it; its inode links ``/proc/<pid>/fd/*`` to the rows
of ``/proc/net/tcp`` and ``tcp6`` (state ``0A`` is LISTEN), whose addresses are hex, each 32-bit word in host byte
order.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

LISTEN = "0A"


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it, children before their own children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the command name (field 2) is in parentheses and may hold spaces: the parent follows the last ")"
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        children.setdefault(parent, []).append(int(entry.name))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def _address(hex_address: str) -> str:
    words = bytes.fromhex(hex_address)
    if sys.byteorder == "little":  # back to network order, word by word
        words = b"".join(words[i : i + 4][::-1] for i in range(0, len(words), 4))
    return socket.inet_ntop(socket.AF_INET if len(words) == 4 else socket.AF_INET6, words)


def _listening_by_inode() -> dict[str, tuple[str, int]]:
    listening: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue  # no IPv6 on this kernel
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN:
                hex_address, hex_port = local.split(":")
                listening[inode] = (_address(hex_address), int(hex_port, 16))
    return listening


def listening_sockets(pids: Iterable[int]) -> list[tuple[int, str, str, int]]:
    """``(pid, command name, address, port)`` of every TCP socket the given processes listen on."""
    listening = _listening_by_inode()
    found = []
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue  # exited while we looked
        for descriptor in descriptors:
            try:
                link = os.readlink(descriptor)
            except OSError:
                continue  # closed since listed (the listing's own descriptor among them)
            inode = link[len("socket:[") : -1] if link.startswith("socket:[") else None
            if inode in listening:
                found.append((pid, name, *listening[inode]))
    return sorted(set(found))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def non_loopback_listeners(pids: Iterable[int]) -> list[str]:
    """``"<pid> <command>: <address>:<port>"`` for each socket of ``pids`` that other hosts can reach (wildcard
    ``0.0.0.0`` / ``::`` included)."""
    return [f"{pid} {name}: {f'[{address}]' if ':' in address else address}:{port}"
            for pid, name, address, port in listening_sockets(pids) if not is_loopback(address)]


@contextmanager
def watch_non_loopback_listeners(root: int | None = None, interval_s: float = 1.0) -> Iterator[list[str]]:
    """Yield a list that collects, while the block runs, every :func:`non_loopback_listeners` line of ``root``'s
    process tree (default: this process): Ray Train workers and their process groups live only during a run."""
    found: list[str] = []
    done = threading.Event()

    def sample() -> None:
        for line in non_loopback_listeners(process_tree(root or os.getpid())):
            if line not in found:
                found.append(line)

    def poll() -> None:
        while not done.wait(interval_s):
            sample()

    poller = threading.Thread(target=poll, name="listener-watch", daemon=True)
    poller.start()
    try:
        yield found
    finally:
        done.set()
        poller.join()
        sample()
