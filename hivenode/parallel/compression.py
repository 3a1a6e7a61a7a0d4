"""Lossy codecs for the all-reduce's traffic: float16 or blockwise 8-bit, chosen per job.

A codec turns a float32 vector into wire tensors and back. The reducer decodes what it sends
back itself, so every replica (the reducer included) applies the same bytes and replicas stay
identical even though the average is approximate.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import numpy as np

from hivenode.parallel.errors import ParallelError
from hivenode.protocol.errors import ProtocolError

INT8_BLOCK = 1024
"""Values per 8-bit block; each block carries its own minimum and step (8 bytes, < 1 %)."""
INT8_LEVELS = 255

Vector = np.ndarray[Any, np.dtype[np.float32]]


class Compression(StrEnum):
    NONE = "none"
    FP16 = "fp16"
    INT8 = "int8"

    @classmethod
    def parse(cls, text: str) -> Compression:
        try:
            return cls(text.lower())
        except ValueError:
            raise ParallelError(
                f"unknown compression {text!r}; choose {', '.join(c.value for c in cls)}"
            ) from None


def encode(values: Vector, compression: Compression) -> tuple[np.ndarray[Any, Any], ...]:
    """`values` (1-D float32) as the tensors that travel."""
    if compression is Compression.NONE:
        return (values,)
    if compression is Compression.FP16:
        # gradients beyond float16's range would become inf and poison the average
        return (np.clip(values, -65504.0, 65504.0).astype(np.float16),)
    return _encode_int8(values)


def decode(
    tensors: tuple[np.ndarray[Any, Any], ...], compression: Compression, size: int
) -> Vector:
    """The float32 vector of `size` values the tensors carry; ProtocolError when they cannot."""
    if compression is Compression.INT8:
        return _decode_int8(tensors, size)
    wanted = np.float32 if compression is Compression.NONE else np.float16
    if len(tensors) != 1 or tensors[0].dtype != wanted or tensors[0].shape != (size,):
        shapes = [(t.dtype.str, t.shape) for t in tensors]
        raise ProtocolError(f"expected one {np.dtype(wanted).str} vector of {size}, got {shapes}")
    return tensors[0].astype(np.float32, copy=False)


def _encode_int8(values: Vector) -> tuple[np.ndarray[Any, Any], ...]:
    blocks = -(-values.size // INT8_BLOCK)
    padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
    padded[: values.size] = values
    grid = padded.reshape(blocks, INT8_BLOCK)
    if values.size % INT8_BLOCK:  # the padding must not widen the last block's range
        grid[-1, values.size % INT8_BLOCK :] = grid[-1, 0]
    low = grid.min(axis=1)
    step = (grid.max(axis=1) - low) / INT8_LEVELS
    safe = np.where(step > 0, step, 1.0)
    codes = np.rint((grid - low[:, None]) / safe[:, None]).astype(np.uint8)
    return codes.reshape(-1)[: values.size], np.stack([low, step], axis=1).astype(np.float32)


def _decode_int8(tensors: tuple[np.ndarray[Any, Any], ...], size: int) -> Vector:
    blocks = -(-size // INT8_BLOCK)
    if (
        len(tensors) != 2
        or tensors[0].dtype != np.uint8
        or tensors[0].shape != (size,)
        or tensors[1].dtype != np.float32
        or tensors[1].shape != (blocks, 2)
    ):
        raise ProtocolError(f"expected 8-bit codes of {size} values and {blocks} block scales")
    codes, scales = tensors
    padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
    padded[:size] = codes
    grid = padded.reshape(blocks, INT8_BLOCK) * scales[:, 1:2] + scales[:, 0:1]
    out: Vector = grid.reshape(-1)[:size].astype(np.float32, copy=False)
    return out
