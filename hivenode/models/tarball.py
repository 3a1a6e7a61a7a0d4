"""Directory models as deterministic tar streams: the same tree always yields the same bytes.

A Hugging Face directory or a TensorFlow SavedModel is stored in the registry as one blob,
so it must hash the same wherever and whenever it is packed: entries in sorted order, mtime 0,
uid/gid 0, no user or group names, modes reduced to 0755 (directories and executables) or
0644. Symlinks to files are stored as the files they point to (Hugging Face cache snapshots
are made of them); symlinked directories and special files are refused.
"""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol, cast

from hivenode.models.errors import ModelError

CHUNK_BYTES = 1024 * 1024


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


def write_tree(root: Path, out: Writable) -> None:
    """Write `root`'s contents (not `root` itself) to `out` as a deterministic GNU tar."""
    entries = _entries(root)
    try:
        # stream mode ("w|") only ever calls write(); typeshed asks for a whole file
        stream = cast(Any, out)
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for relative, path, is_dir in entries:
                info = tarfile.TarInfo(relative)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if is_dir:
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                    continue
                with path.open("rb") as handle:
                    status = os.fstat(handle.fileno())
                    info.size = status.st_size
                    info.mode = 0o755 if status.st_mode & stat.S_IXUSR else 0o644
                    tar.addfile(info, handle)
    except OSError as exc:
        raise ModelError(f"cannot pack {root}: {exc}") from exc
    except tarfile.TarError as exc:  # a file shrank while it was read
        raise ModelError(f"cannot pack {root}: {exc} (was it changed meanwhile?)") from exc


def extract_tree(source: BinaryIO, dest: Path) -> None:
    """Unpack a tar written by `write_tree` into the new directory `dest`, fsyncing files.

    Only plain files and directories with relative names inside `dest` are accepted, since
    a blob may have come from a peer: anything else raises ModelError."""
    dest.mkdir(mode=0o755)
    directories = [dest]
    try:
        with tarfile.open(fileobj=source, mode="r|") as tar:
            for member in tar:
                target = dest / _safe_name(member.name)
                if member.isdir():
                    target.mkdir(mode=0o755, parents=True, exist_ok=True)
                    directories.append(target)
                elif member.isreg():
                    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                    _write_member(tar, member, target)
                else:
                    raise ModelError(f"model archive entry {member.name!r} is not a plain file")
    except (OSError, tarfile.TarError) as exc:
        raise ModelError(f"cannot unpack the model archive into {dest}: {exc}") from exc
    for directory in directories:
        fsync_directory(directory)


def _entries(root: Path) -> list[tuple[str, Path, bool]]:
    """(posix name relative to root, path, is a directory), parents before children."""
    found: list[tuple[tuple[str, ...], Path, bool]] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        base = Path(dirpath)
        for name in dirnames:
            path = base / name
            if path.is_symlink():
                raise ModelError(f"{path}: symlinked directories are not stored; copy it in")
            found.append(((*path.relative_to(root).parts,), path, True))
        for name in filenames:
            path = base / name
            if not path.is_file():
                raise ModelError(f"{path} is neither a file nor a directory (or a broken link)")
            found.append(((*path.relative_to(root).parts,), path, False))
    found.sort(key=lambda entry: entry[0])
    return [("/".join(parts), path, is_dir) for parts, path, is_dir in found]


def _raise(error: OSError) -> None:
    raise ModelError(f"cannot read {error.filename}: {error.strerror}")


def _safe_name(name: str) -> PurePosixPath:
    relative = PurePosixPath(name)
    if relative.is_absolute() or not relative.parts or ".." in relative.parts:
        raise ModelError(f"model archive entry {name!r} points outside its directory")
    return relative


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    reader = tar.extractfile(member)
    if reader is None:
        raise ModelError(f"model archive entry {member.name!r} has no data")
    mode = 0o755 if member.mode & stat.S_IXUSR else 0o644
    with reader, target.open("xb") as handle:
        while chunk := reader.read(CHUNK_BYTES):
            handle.write(chunk)
        handle.flush()
        os.fchmod(handle.fileno(), mode)
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
