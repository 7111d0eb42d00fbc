"""What reproduces a run: package versions, git commit, host facts."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from raysemi.bundled import CHECKOUT

PACKAGES = ("raysemi", "torch", "torchvision", "ray", "optuna", "mlflow", "numpy")


def git_commit() -> str | None:
    """The source checkout's commit; None for an installed wheel, whose folder is site-packages (asking git there
    would record the commit of whatever repository holds the virtualenv)."""
    if not (CHECKOUT / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_model() -> str:
    """The processor's model name. Runs on different CPUs are not bit-identical (their kernels differ, e.g. AMX against
    AVX-512), so two rows that should match can only be compared where this matches too."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def provenance(split_digest: str, weights: str | None = None) -> dict[str, Any]:
    """``weights``: the run's ``model.weights`` file; its sha256 identifies the pretraining a result depends on."""
    record: dict[str, Any] = {
        "versions": versions(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "split_digest": split_digest,
    }
    if weights is not None:
        record["weights"] = {"path": str(Path(weights).resolve()), "sha256": file_sha256(weights)}
    return record
