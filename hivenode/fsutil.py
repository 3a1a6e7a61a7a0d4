"""Atomic file writes: a crash leaves the old file or the new one, never half of either."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
"""What `atomic_write`'s temp files are called: `.NAME.` + mkstemp's 8 characters + `.tmp`."""


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to a temp file beside `path`, fsync it, rename it over `path`, fsync the dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # (a kill between here and the rename leaves this file: sweep_stale_temp_files)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sweep_stale_temp_files(root: Path) -> list[Path]:
    """Delete the temp files of atomic writes a killed process left under `root`; the ones
    deleted. Only while nothing writes there: a daemon calls it before it starts."""
    swept: list[Path] = []
    for directory, _, names in os.walk(root):
        for name in names:
            if TEMP_NAME.match(name):
                path = Path(directory, name)
                path.unlink(missing_ok=True)
                swept.append(path)
    return swept
