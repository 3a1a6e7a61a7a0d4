"""Content-addressed blob store: `blobs/<sha256>`, written atomically, verified by hash.

Every blob enters through a temp file in the store's own directory (so the final rename is
atomic and on the same filesystem), fsynced before it is renamed to its hash and the
directory fsynced after. A crash leaves a blob complete or absent, plus at most a stray
`.incoming-*.tmp`, which the next `BlobStore` removes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from hivenode.models.errors import ModelError
from hivenode.models.tarball import CHUNK_BYTES, extract_tree, fsync_directory, write_tree

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
BlobKind = Literal["file", "directory"]
"""A file is stored as its bytes, a directory as a deterministic tar (tarball.write_tree)."""

_TEMP_PREFIX = ".incoming-"
_TEMP_SUFFIX = ".tmp"
PARTIAL_DIR = "partial"
STRAY_TEMP_AGE = 3600.0
"""Seconds after its last write that a temp file counts as left by a crash."""


def check_sha256(sha: str) -> str:
    """`sha` when it is 64 lowercase hex digits, else ModelError (it names a path)."""
    if not SHA256_PATTERN.fullmatch(sha):
        raise ModelError(f"{sha!r} is not a sha256 (64 lowercase hex digits)")
    return sha


@dataclass(frozen=True)
class StagedBlob:
    """Bytes copied into the store under a temp name, hashed, not yet visible."""

    sha256: str
    size_bytes: int
    kind: BlobKind
    temp_path: Path


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size_bytes = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size_bytes += len(data)
        return self.handle.write(data)


class BlobStore:
    """The blobs directory of one state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._remove_strays()

    def path(self, sha: str) -> Path:
        return self.root / check_sha256(sha)

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def open(self, sha: str) -> BinaryIO:
        try:
            return self.path(sha).open("rb")
        except FileNotFoundError:
            raise ModelError(f"blob {sha} is not in {self.root}") from None

    def partial_path(self, sha: str) -> Path:
        """Where a transfer of blob `sha` keeps what has arrived so far, across restarts,
        so that it can resume; `put_verified` moves it in once complete."""
        return self.root / PARTIAL_DIR / f"{check_sha256(sha)}.part"

    @contextmanager
    def staged(self, source: Path) -> Iterator[StagedBlob]:
        """Copy `source` (a file, or a directory as a tar) into a temp file here while
        hashing it; the temp file is removed on exit unless `commit` renamed it."""
        if source.is_dir():
            kind: BlobKind = "directory"
        elif source.is_file():
            kind = "file"
        elif source.exists():
            raise ModelError(f"{source} is neither a file nor a directory")
        else:
            raise ModelError(f"{source}: no such file or directory")
        with self._temp_file() as (temp, handle):
            writer = _HashingWriter(handle)
            if kind == "directory":
                write_tree(source, writer)
            else:
                _copy_file(source, writer)
            _sync(handle)
            yield StagedBlob(writer.digest.hexdigest(), writer.size_bytes, kind, temp)

    def commit(self, staged: StagedBlob) -> Path:
        """Rename a staged blob to its hash (replacing identical bytes if already there)."""
        target = self.path(staged.sha256)
        os.replace(staged.temp_path, target)
        fsync_directory(self.root)
        return target

    def put_verified(self, source: Path, expected_sha: str) -> Path:
        """Move a received file in as blob `expected_sha` after checking its hash; a file
        whose hash differs raises ModelError and is left where it is for the caller."""
        target = self.path(expected_sha)
        actual = file_sha256(source)
        if actual != expected_sha:
            raise ModelError(
                f"{source} does not match its expected hash: sha256 is {actual}, "
                f"expected {expected_sha}; fetch it again"
            )
        try:
            with source.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise ModelError(f"cannot store blob {expected_sha}: {exc}") from exc
            with self.staged(source) as staged:  # another filesystem: copy in, then rename
                if staged.sha256 != expected_sha:
                    raise ModelError(f"{source} changed while it was stored") from exc
                self.commit(staged)
            source.unlink()
            return target
        fsync_directory(self.root)
        return target

    def delete(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)
        fsync_directory(self.root)

    def export(self, sha: str, kind: BlobKind, dest: Path) -> None:
        """Recreate the stored file or directory at `dest` (the caller checked that it does
        not exist), verifying the blob's hash; written beside `dest`, renamed into place."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if kind == "file":
            self._export_file(sha, dest)
        else:
            self.verify(sha)
            temp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
            try:
                temp.rmdir()  # extract_tree makes the directory itself
                with self.open(sha) as handle:
                    extract_tree(handle, temp)
                os.rename(temp, dest)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
        fsync_directory(dest.parent)

    def verify(self, sha: str) -> None:
        """ModelError when the stored bytes no longer hash to their name."""
        actual = file_sha256(self.path(sha)) if self.has(sha) else None
        if actual != sha:
            problem = "is missing" if actual is None else f"is corrupted (sha256 {actual})"
            raise ModelError(f"blob {sha} in {self.root} {problem}; add the model again")

    def _export_file(self, sha: str, dest: Path) -> None:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        temp = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                writer = _HashingWriter(handle)
                with self.open(sha) as source:
                    _copy_stream(source, writer)
                _sync(handle)
            if writer.digest.hexdigest() != sha:
                raise ModelError(f"blob {sha} in {self.root} is corrupted; add the model again")
            os.chmod(temp, 0o644)
            os.replace(temp, dest)
        finally:
            temp.unlink(missing_ok=True)

    def _remove_strays(self) -> None:
        """Delete temp files a crash left behind. Only old ones: another process (the
        daemon, a CLI call) may be writing a fresh one right now, and a live write keeps
        its file's mtime current."""
        horizon = time.time() - STRAY_TEMP_AGE
        for stray in self.root.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            with suppress(OSError):
                if stray.stat().st_mtime < horizon:
                    stray.unlink()

    @contextmanager
    def _temp_file(self) -> Iterator[tuple[Path, BinaryIO]]:
        fd, name = tempfile.mkstemp(dir=self.root, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
        temp = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield temp, handle
        finally:
            temp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def _copy_file(source: Path, writer: _HashingWriter) -> None:
    try:
        with source.open("rb") as handle:
            _copy_stream(handle, writer)
    except OSError as exc:
        raise ModelError(f"cannot read {source}: {exc.strerror or exc}") from exc


def _copy_stream(source: BinaryIO, writer: _HashingWriter) -> None:
    while chunk := source.read(CHUNK_BYTES):
        writer.write(chunk)


def _sync(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
