"""Flower `Array` <-> numpy without copies: the one converter trainers, the wire and strategies use.

A Flower `Array` holds `np.save` bytes; `Array.numpy()` copies them through `np.load`. Here the
.npy header is parsed and the array is a `np.frombuffer` view over `Array.data`: decoding costs
nothing and the tensor is read once, by whoever uses it.
"""

from __future__ import annotations

import io
import math
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
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ArrayFormatError(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise ArrayFormatError(f"Array data is not a valid .npy buffer: {exc}") from exc
    if dtype.hasobject:
        raise ArrayFormatError(f"Array holds Python objects ({dtype}); refusing to read it")
    count = math.prod(shape)
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ArrayFormatError(
            f"Array data holds {len(data) - offset} bytes after its header, "
            f"expected {count * dtype.itemsize} for {dtype} {shape}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


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
