"""`identify(path)`: what a model file or directory is, decided by its content (magic bytes,
zip members, directory files), with the extension only as a hint, and without running code.

Cost: identification itself reads headers, configs and pickle opcode streams (kilobytes for
safetensors, a 1 GB checkpoint is never loaded); the sha256 reads every byte and dominates
for large files, so callers that only need the shape pass `hash=False`.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import logging
import lzma
import os
import pickletools
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

from hivenode.models.errors import ModelError
from hivenode.models.info import Framework, ModelInfo

logger = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 1024 * 1024
MAX_DECOMPRESSED_BYTES = 8 * 1024**3
"""Compressed joblib files are scanned through a decompressor up to this many bytes."""

_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".bin", ".ckpt")
_PICKLE_OPCODES = frozenset(opcode.code for opcode in pickletools.opcodes)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_EXPECTED_FORMATS = {
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
    ".safetensors": "safetensors",
    ".keras": "keras",
    ".h5": "keras_h5",
    ".hdf5": "keras_h5",
    ".pkl": "pickle",
    ".pickle": "pickle",
    ".joblib": "joblib",
    ".skops": "skops",
    ".onnx": "onnx",
}


def identify(path: Path | str, *, hash: bool = True) -> ModelInfo:
    """Identify the model at `path`: a file, a Hugging Face directory or a SavedModel.

    With `hash=False` the sha256 is left empty and the file's bytes are not read (for a
    safetensors file only its header is). Raises ModelError, with one line that says why,
    for anything that is not a model this can read.
    """
    path = Path(path)
    try:
        info = _identify(path)
        size, digest = _size_and_digest(path, hash)
    except ModelError as exc:
        raise ModelError(f"cannot identify {path}: {exc}") from None
    except Exception as exc:  # any reader's surprise on a hostile file is still a bad file
        logger.debug("identify %s failed", path, exc_info=True)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise ModelError(f"cannot identify {path}: unreadable model file ({reason})") from None
    details = dict(info.details)
    hint = _extension_hint(path, info.format)
    if hint:
        details["extension_hint"] = hint
    logger.debug("identified %s as %s (%s)", path, info.format, info.framework)
    return info.model_copy(update={"size_bytes": size, "sha256": digest, "details": details})


def _identify(path: Path) -> ModelInfo:
    if not path.exists():
        raise ModelError("no such file or directory")
    if path.is_dir():
        return _identify_directory(path)
    if not path.is_file():
        raise ModelError("not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise ModelError("the file is empty")
    with path.open("rb") as handle:
        head = handle.read(64)
    suffix = path.suffix.lower()

    if head.startswith(_ZIP_MAGIC):
        return _identify_zip(path)
    if head.startswith(_HDF5_MAGIC):
        from hivenode.models.identify_keras import identify_keras_h5

        return identify_keras_h5(path)
    from hivenode.models.identify_safetensors import identify_safetensors, looks_like_safetensors

    if looks_like_safetensors(head, size):
        return identify_safetensors(path)
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return _identify_pickle_file(path, suffix)
    opener = _decompressor(head)
    if opener is not None:
        with opener(path) as stream:
            return _identify_pickle(stream, suffix, compressed=True, size=MAX_DECOMPRESSED_BYTES)
    from hivenode.models.identify_onnx import identify_onnx, looks_like_onnx

    if looks_like_onnx(head) or suffix == ".onnx":
        try:
            return identify_onnx(path)
        except ModelError as exc:
            if suffix == ".onnx":
                raise ModelError(f"not a valid ONNX model ({exc})") from None
    if _may_be_old_pickle(path, head):  # protocol 0/1 pickles have no header
        try:
            return _identify_pickle_file(path, suffix)
        except ModelError:
            if suffix in _PICKLE_SUFFIXES:
                raise
    named = f" (the {suffix} extension is only a hint)" if suffix else ""
    raise ModelError(
        "unrecognised content: not safetensors, a zip (torch, Keras, skops), HDF5, a pickle, "
        f"joblib or ONNX{named}"
    )


def _may_be_old_pickle(path: Path, head: bytes) -> bool:
    """Starts with a pickle opcode and ends with STOP: worth an opcode scan."""
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
    return last == b"." and chr(head[0]) in _PICKLE_OPCODES


def _identify_directory(path: Path) -> ModelInfo:
    from hivenode.models.identify_hf import identify_hf, is_hf_directory
    from hivenode.models.identify_savedmodel import identify_savedmodel, is_savedmodel

    if is_savedmodel(path):
        return identify_savedmodel(path)
    if is_hf_directory(path):
        return identify_hf(path)
    raise ModelError(
        "directory has neither config.json (Hugging Face) nor saved_model.pb "
        "(TensorFlow SavedModel)"
    )


def _identify_zip(path: Path) -> ModelInfo:
    from hivenode.models.identify_keras import identify_keras_zip, is_keras_zip
    from hivenode.models.identify_sklearn import skops_info
    from hivenode.models.identify_torch import identify_torch_zip, torch_zip_prefix

    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"truncated or corrupt zip archive ({exc})") from None
    with archive:
        names = set(archive.namelist())
        if torch_zip_prefix(archive) is not None:
            return identify_torch_zip(path, archive)
        if is_keras_zip(names):
            return identify_keras_zip(archive)
        if "schema.json" in names:
            return skops_info(archive)
    raise ModelError(
        "zip archive is not a model: no data.pkl (torch), config.json (Keras) or "
        "schema.json (skops)"
    )


def _identify_pickle_file(path: Path, suffix: str) -> ModelInfo:
    with path.open("rb") as stream:
        return _identify_pickle(stream, suffix, compressed=False, size=None)


def _identify_pickle(
    stream: IO[bytes], suffix: str, *, compressed: bool, size: int | None
) -> ModelInfo:
    from hivenode.models import identify_sklearn, identify_torch
    from hivenode.models.pickle_scan import JOBLIB_WRAPPER, scan_stream

    scan = scan_stream(stream, joblib_arrays=True, size=size)
    if scan.root == identify_torch.LEGACY_MAGIC and not compressed:
        stream.seek(0)
        return identify_torch.identify_torch_legacy(stream)
    joblib = compressed or suffix == ".joblib" or JOBLIB_WRAPPER in scan.globals
    if identify_sklearn.is_sklearn(scan.globals):
        try:
            return identify_sklearn.pickle_info(scan, "joblib" if joblib else "sklearn_pickle")
        except ModelError:
            pass  # sklearn objects but no estimator at the top: report it as a pickle
    if identify_torch.is_torch_pickle(scan):
        return identify_torch.pickle_info(scan)
    return ModelInfo(
        format="joblib" if joblib else "pickle",
        framework=Framework.UNKNOWN,
        safe=not scan.unsafe_globals,
        unsafe_globals=scan.unsafe_globals,
        details={"globals": list(scan.globals), "top_level": _describe(scan.root)},
    )


def _describe(value: Any) -> str:
    from hivenode.models.pickle_scan import Call

    if isinstance(value, Call):
        return f"call of {value.func_name}"
    return type(value).__name__


def _decompressor(head: bytes) -> Any:
    """An opener for joblib's compressed formats (zlib, gzip, bz2, xz, lzma), or None."""
    if len(head) >= 2 and head[0] == 0x78 and (head[0] * 256 + head[1]) % 31 == 0:
        return _ZlibFile
    if head.startswith(b"\x1f\x8b"):
        return gzip.open
    if head.startswith(b"BZh"):
        return bz2.open
    if head.startswith(b"\xfd7zXZ") or head.startswith(b"\x5d\x00\x00"):
        return lzma.open
    return None


class _ZlibFile:
    """A forward-only reader over a zlib stream (joblib's default `compress=` format)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        self._inflate = zlib.decompressobj()
        self._buffer = b""
        self._position = 0

    def __enter__(self) -> _ZlibFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            raw = self._file.read(HASH_CHUNK_BYTES)
            if not raw:
                self._buffer += self._inflate.flush()
                break
            self._buffer += self._inflate.decompress(raw)
        if size < 0:
            size = len(self._buffer)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        self._position += len(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        line = bytearray()
        while not line.endswith(b"\n") and (limit < 0 or len(line) < limit):
            char = self.read(1)
            if not char:
                break
            line += char
        return bytes(line)


def _extension_hint(path: Path, fmt: str) -> str | None:
    """A note when the extension names another format than the content (content wins)."""
    expected = _EXPECTED_FORMATS.get(path.suffix.lower())
    if expected is None or path.is_dir():
        return None
    compatible = {
        "torch": fmt.startswith("torch"),
        "pickle": fmt in ("pickle", "sklearn_pickle", "joblib") or fmt.startswith("torch"),
        "joblib": fmt in ("pickle", "sklearn_pickle", "joblib"),
    }
    if fmt.startswith(expected) or compatible.get(expected, False):
        return None
    return f"the {path.suffix} extension suggests {expected}, the content is {fmt}"


# --- size and sha256 -----------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """The file's sha256, streamed in 1 MiB chunks through one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _directory_files(path: Path) -> list[Path]:
    files: list[Path] = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        files.extend(Path(root) / name for name in sorted(names))
    return files


def _size_and_digest(path: Path, with_hash: bool) -> tuple[int, str]:
    """Size in bytes and sha256; for a directory the total size and the sha256 of its
    manifest: one `<file sha256>  <relative path>` line per file, sorted by path (what
    `sha256sum` prints), so equal trees hash equal wherever they live."""
    if not path.is_dir():
        return path.stat().st_size, sha256_file(path) if with_hash else ""
    files = sorted(_directory_files(path), key=lambda file: file.relative_to(path).as_posix())
    size = sum(file.stat().st_size for file in files)
    if not with_hash:
        return size, ""
    manifest = "".join(
        f"{sha256_file(file)}  {file.relative_to(path).as_posix()}\n" for file in files
    )
    return size, hashlib.sha256(manifest.encode()).hexdigest()
