"""Flower `Array` <-> numpy without copies: the one converter trainers, the wire and strategies use.

A Flower `Array` holds `np.save` bytes; `Array.numpy()` copies them through `np.load`. Here the
.npy header is parsed and the array is a `np.frombuffer` view over `Array.data`: decoding costs
nothing and the tensor is read once, by whoever uses it.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import tokenize
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

NDArray = np.ndarray[Any, Any]


class ArrayFormatError(ValueError):
    """A Flower Array that is not a plain numeric .npy buffer of the size it declares."""


NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY


def array_to_numpy(array: Array) -> NDArray:
    """A read-only view over a Flower Array's .npy bytes, without copying them."""
    if array.stype != NUMPY_STYPE:
        raise ArrayFormatError(f"cannot read an Array of serialisation type {array.stype!r}")
    data = array.data
    header = _header_bytes(data)
    shape, fortran_order, dtype = _parse_header(header)
    count = math.prod(shape)
    offset = len(header)
    if len(data) - offset != count * dtype.itemsize:
        raise ArrayFormatError(
            f"Array data holds {len(data) - offset} bytes after its header, "
            f"expected {count * dtype.itemsize} for {dtype} {shape}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


_MAGIC = b"\x93NUMPY"
_HEADER_LENGTH = {1: struct.Struct("<H"), 2: struct.Struct("<I"), 3: struct.Struct("<I")}


def _header_bytes(data: bytes) -> bytes:
    """The .npy magic, version and header dict: everything before the array's first byte."""
    major = data[6] if len(data) > 7 and data.startswith(_MAGIC) else None
    length = _HEADER_LENGTH.get(major) if major is not None else None
    if length is None or len(data) < 8 + length.size:
        raise ArrayFormatError("Array data is not a valid .npy buffer (bad magic or version)")
    (size,) = length.unpack_from(data, 8)
    end = 8 + length.size + size
    if len(data) < end:
        raise ArrayFormatError("Array data is not a valid .npy buffer (truncated header)")
    return data[:end]


@functools.lru_cache(maxsize=4096)
def _parse_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """numpy's own (safe, literal-only) header parser, once per distinct header: every
    trainer's update of a model has the same headers, and parsing one costs ~35 µs (a third
    of averaging 100 updates of a 1M-parameter model)."""
    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ArrayFormatError(f"unsupported .npy version {version}")
    # numpy parses the header with ast.literal_eval: besides ValueError it raises SyntaxError,
    # TokenError, TypeError (an unhashable key) and RecursionError (deep nesting)
    except (ValueError, SyntaxError, TypeError, RecursionError, tokenize.TokenError) as exc:
        raise ArrayFormatError(f"Array data is not a valid .npy buffer: {exc}") from exc
    if stream.tell() != len(header):
        raise ArrayFormatError("Array data is not a valid .npy buffer (header length)")
    if dtype.hasobject:
        raise ArrayFormatError(f"Array holds Python objects ({dtype}); refusing to read it")
    if dtype.kind not in "biufc" or dtype.itemsize == 0:  # plain numbers only, as documented
        raise ArrayFormatError(f"Array dtype {dtype} is not a plain numeric type")
    return tuple(shape), bool(fortran_order), dtype


def numpy_to_array(array: NDArray) -> Array:
    """A Flower Array (the same fields as `Array(ndarray)`), built with one copy, not two."""
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    header = io.BytesIO()
    header_fields = np.lib.format.header_data_from_array_1_0(array)
    try:
        np.lib.format.write_array_header_1_0(header, header_fields)
    except ValueError:  # a header too long for version 1.0, as np.save would do
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, header_fields)
    data = b"".join((header.getvalue(), array.reshape(-1).view(np.uint8).data))
    return Array(dtype=str(array.dtype), shape=tuple(array.shape), stype=NUMPY_STYPE, data=data)


def arrayrecord_to_numpy(record: ArrayRecord) -> dict[str, NDArray]:
    """Zero-copy views of every Array in `record`, by key."""
    return {key: array_to_numpy(value) for key, value in record.items()}
