"""One checkpoint format for plain runs, Ray Train runs and Tune trials: a single ``state.pt`` dict of tensors and
plain values, written atomically and read with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from raysemi.errors import CheckpointError

STATE_FILE = "state.pt"
#: How many checkpoints Ray keeps per run (Ray Train) and per trial (Tune): the best by the score, plus the latest.
KEEP_CHECKPOINTS = 2
FORMAT_VERSION = 1
#: What every reader needs besides the weights: the run's resolved config and the classes the head predicts.
REQUIRED_KEYS = ("method_name", "num_classes", "config")


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread could create a file
    os.umask(mask)
    return mask


#: What ``open`` would give a new file under the process's umask.
FILE_MODE = 0o666 & ~_umask()


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` through a temporary file in the same folder and ``os.replace``, so a crash
    mid-write never leaves a truncated checkpoint where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)  # mkstemp's 0600, not what the user's umask gives every other file of the run
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and _is_write_failure(exc)):
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            free = shutil.disk_usage(path.parent).free / 2**20
            kept = "the previous checkpoint is kept" if path.exists() else "no earlier checkpoint"
            raise CheckpointError(f"{path}: checkpoint not written ({reason[:120]}; {free:.1f} MiB free there); "
                                  f"{kept}") from None
        raise
    return path


def _is_write_failure(exc: RuntimeError) -> bool:
    """torch.save's zip writer reports a short write (a full disk, a size limit) as a RuntimeError."""
    return any(sign in str(exc) for sign in ("unexpected pos", "file write failed"))


def remove_stale_temp_files(folder: Path) -> None:
    """Remove the temporary files ``save_atomic`` leaves in ``folder`` when it is killed mid-write; call it only
    where no other process can be writing there (under the run folder's lock)."""
    for path in folder.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def resolve_state_file(path: str | Path) -> Path:
    """A checkpoint is a ``state.pt`` file or a folder holding one (Ray checkpoints are folders)."""
    p = Path(path)
    if p.is_dir():
        p = p / STATE_FILE
    if not p.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return p


def load_state(path: str | Path) -> dict[str, Any]:
    p = resolve_state_file(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{p}: corrupt or unreadable checkpoint ({reason[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "method" not in state:
        raise CheckpointError(f"{p}: not a raysemi checkpoint (format {FORMAT_VERSION} expected)")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{p}: incomplete raysemi checkpoint, no {', '.join(missing)} (eval, predict and resume rebuild the run from them)")
    return state
