"""Atomic writes and the sweep of the temp files a killed writer leaves."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hivenode.fsutil import atomic_write, sweep_stale_temp_files


def test_an_atomic_write_replaces_the_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "qtable.json"
    atomic_write(path, b"old")
    atomic_write(path, b"new", mode=0o640)
    assert path.read_bytes() == b"new" and os.stat(path).st_mode & 0o777 == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["qtable.json"]


def test_the_sweep_removes_only_what_a_killed_atomic_write_left(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs" / "a"
    jobs.mkdir(parents=True)
    # what atomic_write's mkstemp makes, as a kill before the rename leaves it
    _, left = tempfile.mkstemp(dir=jobs, prefix=".checkpoint.json.", suffix=".tmp")
    kept = [jobs / "checkpoint.json", jobs / "notes.tmp", tmp_path / ".hidden.tmp"]
    for path in kept:
        path.write_bytes(b"x")
    assert sweep_stale_temp_files(tmp_path) == [Path(left)]
    assert not Path(left).exists() and all(path.exists() for path in kept)
