"""Fuzz targets that read model files a peer may hand over: pickle opcodes, ONNX and
SavedModel protobuf, safetensors headers, and identify() on files of every kind."""

from __future__ import annotations

import atexit
import functools
import io
import os
import shutil
import tempfile
from pathlib import Path

Errors = tuple[type[BaseException], ...]


def model_error() -> Errors:
    from hivenode.models.errors import ModelError

    return (ModelError,)


def feed_pickle(data: bytes) -> None:
    from hivenode.models.pickle_scan import scan_bytes, scan_stream, walk

    scan = scan_stream(io.BytesIO(data), joblib_arrays=True)
    for _ in walk(scan.root):
        pass
    scan_bytes(data, torchscript=True)


def feed_protobuf(data: bytes) -> None:
    """ONNX and SavedModel parsing over the bytes (a memory map in production)."""
    from hivenode.models import identify_onnx, identify_savedmodel

    refused = []
    for parse in (identify_onnx._identify, identify_savedmodel._identify):
        try:
            parse(memoryview(data))
        except model_error() as exc:
            refused.append(exc)
    if len(refused) == 2:  # neither reads it: a refusal (one of them reading it is fine)
        raise refused[0]


@functools.cache
def scratch_dir() -> Path:
    """Where file-reading targets write their input: tmpfs when there is one."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="hivenode-fuzz-", dir=base))
    atexit.register(shutil.rmtree, path, ignore_errors=True)  # tmpfs is memory: give it back
    return path


def _as_file(data: bytes, suffix: str) -> Path:
    path = scratch_dir() / f"input{suffix}"
    path.write_bytes(data)
    return path


def feed_safetensors(data: bytes) -> None:
    from hivenode.models.identify_safetensors import identify_safetensors, read_header

    path = _as_file(data, ".safetensors")
    read_header(path)
    identify_safetensors(path)


IDENTIFY_SUFFIXES = (".pt", ".pkl", ".joblib", ".onnx", ".safetensors", ".keras", ".h5", ".bin", "")


def feed_identify(data: bytes) -> None:
    """The public entry point on a file named by the first byte's pick of suffix."""
    from hivenode.models.identify import identify

    suffix = IDENTIFY_SUFFIXES[data[0] % len(IDENTIFY_SUFFIXES)] if data else ""
    identify(_as_file(data[1:], suffix), hash=False)


def identify_masks(exc: BaseException) -> bool:
    """identify() turns any reader's exception into ModelError("unreadable model file (...)"):
    accepted, but it means a reader raised something it does not document."""
    return "unreadable model file (" in str(exc)
