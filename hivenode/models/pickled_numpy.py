"""Numpy arrays and dtypes as they appear in a scanned pickle, read without unpickling.

An array is pickled as `_reconstruct(ndarray, (0,), b'b')` + BUILD `(version, shape, dtype,
is_fortran, raw_bytes)` (protocol ≤ 4), as `_frombuffer(buffer, dtype, shape, order)`
(protocol 5), or by joblib as a `NumpyArrayWrapper` followed by the raw bytes. A dtype is
`numpy.dtype(code, align, copy)` + BUILD `(version, byteorder, subarray, names, fields,
itemsize, alignment, flags)`. Building a `numpy.dtype` from a type code string runs no code
from the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hivenode.models.pickle_scan import JOBLIB_WRAPPER, Call

_RECONSTRUCT = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
_FROMBUFFER = {"numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer"}
_SCALAR = {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}


@dataclass(frozen=True, eq=False)
class ArrayInfo:
    """What we know of one array: always its shape and dtype, its bytes when they are at hand."""

    shape: tuple[int, ...]
    dtype: str
    """numpy's name (float64, int64, object), or `structured` for record arrays."""
    itemsize: int
    raw: bytes | None = None
    objects: list[Any] | None = None
    """The elements of an object-dtype array (symbolic values)."""
    spec: str | None = None
    """numpy's dtype string with byte order (`>f8`, `<U3`), to decode `raw`."""

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    def values(self, limit: int = 1000) -> list[Any] | None:
        """The elements as Python values, for small numeric, bool or string arrays."""
        if self.objects is not None:
            return self.objects[:limit] if self.size <= limit else None
        if self.raw is None or self.size > limit:
            return None
        try:
            dtype = np.dtype(self.spec or self.dtype)
            if dtype.hasobject or dtype.names or len(self.raw) != self.size * dtype.itemsize:
                return None
            values: list[Any] = np.frombuffer(self.raw, dtype=dtype).tolist()
        except (TypeError, ValueError, SyntaxError):
            return None
        return values


def dtype_of(value: Any) -> np.dtype[Any] | None:
    """The numpy dtype a pickled `numpy.dtype(...)` call describes, or None."""
    if isinstance(value, np.dtype):
        return value
    if not isinstance(value, Call) or value.func_name != "numpy.dtype":
        return None
    if not value.args or not isinstance(value.args[0], str):
        return None
    state = value.state if isinstance(value.state, tuple) else ()
    try:
        dtype = np.dtype(value.args[0])
        byteorder = state[1] if len(state) > 1 and isinstance(state[1], str) else "="
        if dtype.kind in "biufcmM" and byteorder in ("<", ">"):
            dtype = dtype.newbyteorder("<" if byteorder == "<" else ">")
        itemsize = state[5] if len(state) > 5 and isinstance(state[5], int) else -1
        if dtype.kind in "VUS" and itemsize > 0 and itemsize != dtype.itemsize:
            names = state[3] if len(state) > 3 else None
            if dtype.kind == "V" or names:
                dtype = np.dtype((np.void, itemsize))
            else:
                unit = 4 if dtype.kind == "U" else 1
                dtype = np.dtype(f"{dtype.kind}{itemsize // unit}")
    except (TypeError, ValueError, SyntaxError):  # numpy parses some dtype strings as Python
        return None
    return dtype


def as_array(value: Any) -> ArrayInfo | None:
    """The array a scanned value stands for, or None when it is not one."""
    if isinstance(value, ArrayInfo):
        return value
    if not isinstance(value, Call):
        return None
    name = value.func_name
    if name in _RECONSTRUCT:
        return _from_reconstruct(value)
    if name in _FROMBUFFER:
        return _from_frombuffer(value)
    if name == JOBLIB_WRAPPER:
        return _from_joblib(value)
    return None


def scalar_value(value: Any) -> Any:
    """A pickled numpy scalar (`numpy.int64(3)`) as a Python value; other values unchanged."""
    if isinstance(value, Call) and value.func_name in _SCALAR and len(value.args) == 2:
        dtype = dtype_of(value.args[0])
        raw = value.args[1]
        if dtype is not None and isinstance(raw, bytes) and not dtype.hasobject:
            try:
                return np.frombuffer(raw, dtype=dtype, count=1)[0].item()
            except (TypeError, ValueError):
                return None
    return value


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, tuple | list) and all(isinstance(dim, int) for dim in value):
        return tuple(int(dim) for dim in value)
    if isinstance(value, int):
        return (value,)
    return None


def _info(shape: tuple[int, ...], dtype: np.dtype[Any], raw: Any) -> ArrayInfo:
    if dtype.hasobject:
        objects = list(raw) if isinstance(raw, list | tuple) else None
        return ArrayInfo(shape, "object", dtype.itemsize, objects=objects)
    name = "structured" if dtype.names or dtype.kind == "V" else dtype.name
    data = raw if isinstance(raw, bytes) else None
    return ArrayInfo(shape, name, dtype.itemsize, raw=data, spec=dtype.str)


def _from_reconstruct(call: Call) -> ArrayInfo | None:
    state = call.state
    if not isinstance(state, tuple) or len(state) < 5:
        return None
    shape = _shape(state[1])
    dtype = dtype_of(state[2])
    if shape is None or dtype is None:
        return None
    return _info(shape, dtype, state[4])


def _from_frombuffer(call: Call) -> ArrayInfo | None:
    if len(call.args) < 3:
        return None
    dtype = dtype_of(call.args[1])
    shape = _shape(call.args[2])
    if shape is None or dtype is None:
        return None
    return _info(shape, dtype, call.args[0])


def _from_joblib(call: Call) -> ArrayInfo | None:
    state = call.state if isinstance(call.state, dict) else {}
    shape = _shape(state.get("shape"))
    dtype = dtype_of(state.get("dtype"))
    if shape is None or dtype is None:
        return None
    if dtype.hasobject:
        nested = as_array(call.nested)
        objects = nested.objects if nested is not None else None
        return ArrayInfo(shape, "object", dtype.itemsize, objects=objects)
    return _info(shape, dtype, call.payload)
