"""Tensors in JSON, for the control API and its clients: `{"dtype", "shape", "b64"}` (the
raw little-endian bytes, base64), or on input a plain nested list of numbers."""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np

from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.runtime import NDArray
from hivenode.protocol.message import ALLOWED_DTYPES


def tensor_to_json(array: NDArray) -> dict[str, Any]:
    wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {
        "dtype": wire.dtype.name,
        "shape": list(wire.shape),
        "b64": base64.b64encode(wire.tobytes()).decode("ascii"),
    }


def tensor_from_json(raw: Any) -> NDArray:
    """A tensor from either form; InferenceError(bad_input) saying what is wrong."""
    if isinstance(raw, list):
        try:
            array = np.asarray(raw)
        except ValueError as exc:  # ragged lists
            raise InferenceError(Code.BAD_INPUT, f"input is not rectangular: {exc}") from exc
        if array.dtype.kind not in "biuf":
            raise InferenceError(Code.BAD_INPUT, "input lists must hold numbers only")
        return array
    if not isinstance(raw, dict) or not {"dtype", "shape", "b64"} <= raw.keys():
        raise InferenceError(
            Code.BAD_INPUT, 'a tensor is a nested list or {"dtype", "shape", "b64"}'
        )
    try:
        dtype = np.dtype(str(raw["dtype"])).newbyteorder("<")
        shape = tuple(int(d) for d in raw["shape"])
        data = base64.b64decode(str(raw["b64"]), validate=True)
    except (TypeError, ValueError, OverflowError, SyntaxError, binascii.Error) as exc:
        # numpy's dtype parser raises SyntaxError on some strings; int(inf) OverflowError
        raise InferenceError(Code.BAD_INPUT, f"unreadable tensor: {exc}") from exc
    if dtype.str not in ALLOWED_DTYPES:
        raise InferenceError(Code.BAD_INPUT, f"dtype {dtype.name} is not carried")
    # math.prod: np.prod wraps around int64 for huge shapes and a forged one would pass
    if any(d < 0 for d in shape) or math.prod(shape) * dtype.itemsize != len(data):
        raise InferenceError(
            Code.BAD_INPUT, f"{len(data)} bytes do not make a {dtype.name} tensor of {list(shape)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)
