"""safetensors files, from their JSON header alone: 8 bytes of length, then the header; the
tensor bytes after it are never read (a 1 GB file costs a few kilobytes of reading)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from hivenode.models.classify import classify
from hivenode.models.errors import ModelError
from hivenode.models.info import Framework, ModelInfo
from hivenode.models.weights import SAFETENSORS_ITEMSIZE, Tensor, count, dtype_name, dtypes
from hivenode.models.weights import layer_summary as summarise

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors library's own limit on the JSON header."""

_FRAMEWORKS = {"pt": Framework.TORCH, "torch": Framework.TORCH, "tf": Framework.TENSORFLOW}


def looks_like_safetensors(head: bytes, file_size: int) -> bool:
    """The first bytes are a plausible header length followed by `{`."""
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= min(MAX_HEADER_BYTES, file_size - 8) and head[8:9] == b"{"


def read_header(path: Path) -> tuple[list[Tensor], dict[str, str]]:
    """The tensors a safetensors file declares and its `__metadata__`; ModelError when the
    header is malformed or the file is shorter than the header says."""
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ModelError("truncated safetensors file: shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or length > file_size - 8:
            raise ModelError(
                f"safetensors header claims {length} bytes but the file has {file_size - 8} "
                "after the length (truncated or not safetensors)"
            )
        raw = handle.read(length)
    try:
        header: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelError("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = file_size - 8 - length
    tensors: list[Tensor] = []
    for name, entry in header.items():
        tensors.append(_tensor(name, entry, data_size))
    if not isinstance(metadata, dict):
        raise ModelError("safetensors __metadata__ is not a JSON object")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor(name: str, entry: Any, data_size: int) -> Tensor:
    try:
        code = str(entry["dtype"])
        shape = tuple(int(dim) for dim in entry["shape"])
        begin, end = (int(offset) for offset in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"safetensors entry {name!r} lacks dtype, shape or data_offsets") from exc
    if any(dim < 0 for dim in shape) or not 0 <= begin <= end:
        raise ModelError(f"safetensors entry {name!r} has a negative shape or offsets")
    if end > data_size:
        raise ModelError(
            f"truncated safetensors file: tensor {name!r} ends at byte {end} of the data, "
            f"which has only {data_size}"
        )
    tensor = Tensor(name=name, shape=shape, dtype=dtype_name(code), storage=(begin, end))
    itemsize = SAFETENSORS_ITEMSIZE.get(code)
    if itemsize is not None and end - begin != tensor.numel * itemsize:
        raise ModelError(
            f"safetensors entry {name!r}: {end - begin} bytes for {tensor.numel} × {code}"
        )
    return tensor


def identify_safetensors(path: Path) -> ModelInfo:
    tensors, metadata = read_header(path)
    counts = count(tensors)
    layers = summarise(tensors)
    kind = classify(layers, [t.name for t in tensors])
    framework = _FRAMEWORKS.get(metadata.get("format", ""), Framework.SAFETENSORS)
    return ModelInfo(
        format="safetensors",
        framework=framework,
        family=kind.family,
        subtype=kind.subtype,
        architecture=kind.architecture,
        parameters=counts.parameters,
        dtypes=dtypes(tensors),
        layers=layers,
        details={
            "tensors": len(tensors),
            "buffers": counts.buffers,
            "buffer_elements": counts.buffer_elements,
            "metadata": metadata,
        },
    )
