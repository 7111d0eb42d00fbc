"""The policy for a run folder (``--out``) that ``raysemi train`` writes into.

- A folder that already holds a run (its ``config.yaml``, ``summary.json`` or ``checkpoints/last.pt``) is refused
  unless ``--resume`` (continue it) or ``--overwrite`` (replace it: the old run's files are removed first).
- One writer at a time: the command holds an exclusive lock on ``<out>/.raysemi.lock`` for its whole run, so a second
  command on the same folder stops at once instead of the last writer silently winning. Holding it, the command
  removes the temporary checkpoint files a killed writer left in ``<out>/checkpoints``.
- A folder that cannot be written (read-only, or below a file) is refused before anything is changed in it.
- ``--resume`` starts from the run's saved ``config.yaml`` (flags given again are applied on top) and refuses any
  change that would make the run's record false: the method and its hyperparameters, the model, the dataset, the
  labelled split, the seed and the iteration budget.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raysemi.engine.checkpoint import remove_stale_temp_files
from raysemi.errors import ConfigError

LOCK_NAME = ".raysemi.lock"
SUMMARY_NAME = "summary.json"
RUN_FILES = ("config.yaml", SUMMARY_NAME, "checkpoints/last.pt")
#: Files and folders of a run that ``--overwrite`` removes.
RUN_CONTENTS = ("config.yaml", SUMMARY_NAME, "provenance.json", "checkpoints", "split")
#: Config keys a resumed run may not change (section, key); ``None`` = the whole section.
FROZEN_ON_RESUME = (
    ("method", None),
    ("model", "name"),
    ("model", "options"),
    ("data", "dataset"),
    ("data", "labeled"),
    ("data", "split_seed"),
    ("data", "resolution_scale"),
    ("data", "crop_size"),
    ("data", "batch_size"),
    ("train", "seed"),
    ("train", "iters"),
)


class RunFolderLock:
    """An exclusive, non-blocking ``flock`` on the run folder's lock file, released on ``close`` or process exit
    (also after ``kill -9``: the kernel drops the lock with the file descriptor)."""

    def __init__(self, out: Path) -> None:
        require_writable(out)
        self.path = out / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ConfigError(f"{out}: another raysemi command is writing this run folder (lock {self.path})") from None

    def close(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def require_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be made in it, so a run folder that cannot be written fails before the
    run starts (a lock file left by an earlier run would not show it)."""
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"{out}: cannot create the run folder, {blocker} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".raysemi-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write the run folder ({exc.strerror}); choose another --out") from None


def existing_run(out: Path) -> str | None:
    """The first file that shows ``out`` already holds a run, or None."""
    return next((name for name in RUN_FILES if (out / name).exists()), None)


def claim(out: Path, resume: bool, overwrite: bool) -> RunFolderLock:
    """Lock ``out`` for this command and apply the existing-run policy (module doc)."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    lock = RunFolderLock(out)
    try:
        found = existing_run(out)
        if found and not resume and not overwrite:
            raise ConfigError(f"{out}: already holds a run ({found}); --resume continues it, --overwrite replaces it")
        if overwrite:
            for name in RUN_CONTENTS:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        # the lock proves no other writer: temporary checkpoint files here are left by a killed one
        remove_stale_temp_files(out / "checkpoints")
    except BaseException:
        lock.close()
        raise
    return lock


def check_resume(saved: dict[str, Any], resumed: dict[str, Any], out: Path) -> None:
    """Fail naming the first key in ``FROZEN_ON_RESUME`` whose value differs between the saved and the resumed
    config (both plain dicts with lists, as ``config.to_dict`` and the saved YAML give them)."""
    for section, key in FROZEN_ON_RESUME:
        before = saved.get(section, {}) if key is None else saved.get(section, {}).get(key)
        after = resumed.get(section, {}) if key is None else resumed.get(section, {}).get(key)
        if before != after:
            name = section if key is None else f"{section}.{key}"
            raise ConfigError(
                f"{out}: --resume cannot change {name} ({_short(before)} -> {_short(after)}); the run was made with "
                "the saved config.yaml (start a new run with another --out instead)"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def write_summary(out: str | Path, summary: dict[str, Any]) -> None:
    """``<out>/summary.json``: the plain loop writes it at the end of a run, a Ray Train run again with what only
    the driver knows (workers, storage, the best checkpoint)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str))


def read_summary(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / SUMMARY_NAME).read_text())
