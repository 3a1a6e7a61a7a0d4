"""Lossy codecs for float32 vectors on the wire: float16, blockwise 8-bit and top-k.

A codec turns a float32 vector into wire tensors and back. The all-reduce uses float16 or
8-bit, chosen per job: the reducer decodes what it sends back itself, so every replica (the
reducer included) applies the same bytes and replicas stay identical even though the average
is approximate. Federated updates use all three (`hivenode.agent.update_codec`); top-k
is not a `Compression` of the all-reduce because it needs a fraction and, to converge, a
sender that keeps what it did not send (error feedback), which the reducer's shares lack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import numpy as np

from hivenode.protocol.errors import ProtocolError

INT8_BLOCK = 1024
"""Values per 8-bit block; each block carries its own minimum and step (8 bytes, < 1 %)."""
INT8_LEVELS = 255
INT32_MAX = 2**31 - 1

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
            raise CompressionError(
                f"unknown compression {text!r}; choose {', '.join(c.value for c in cls)}"
            ) from None


UpdateKind = Literal["none", "fp16", "int8", "topk"]
NO_FEEDBACK = "no-feedback"
UPDATE_SCHEMES = "none | fp16 | int8 | topk:F (0 < F ≤ 1) | topk:F:no-feedback"
_PLAIN: dict[str, UpdateKind] = {"none": "none", "fp16": "fp16", "int8": "int8"}


class CompressionError(ValueError):
    """An update compression scheme that cannot be parsed; the message names the valid ones.
    A ValueError, so a job spec's validator reports it as a field error."""


@dataclass(frozen=True)
class UpdateCompression:
    """How a federated job's trainers compress their updates (`hivenode.agent.
    update_codec`); `str()` gives the canonical text that job specs and manifests hold."""

    kind: UpdateKind = "none"
    fraction: float = 1.0
    """top-k: the share of each array's values sent."""
    feedback: bool = True
    """top-k: keep the unsent part and add it to the next round's update."""

    @classmethod
    def parse(cls, text: str) -> UpdateCompression:
        name, _, rest = text.strip().lower().partition(":")
        if name in _PLAIN and not rest:
            return cls(_PLAIN[name])
        if name == "topk" and rest:
            fraction_text, _, option = rest.partition(":")
            try:
                fraction = float(fraction_text)
            except ValueError:
                fraction = math.nan
            if 0 < fraction <= 1 and option in ("", NO_FEEDBACK):
                return cls("topk", fraction, feedback=option != NO_FEEDBACK)
        raise CompressionError(f"compression {text!r} is not one of {UPDATE_SCHEMES}")

    def __str__(self) -> str:
        if self.kind != "topk":
            return self.kind
        # repr: the shortest text that parses back to the same float, so trainer and
        # aggregator, each parsing the job's text, agree on every top-k count
        return f"topk:{self.fraction!r}" + ("" if self.feedback else f":{NO_FEEDBACK}")

    @property
    def parts_per_array(self) -> int:
        """Wire tensors per compressed array: fp16 one; int8 codes and block scales; top-k
        indices and values."""
        return {"none": 1, "fp16": 1, "int8": 2, "topk": 2}[self.kind]

    @property
    def keeps_residual(self) -> bool:
        return self.kind == "topk" and self.feedback


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


def topk_count(size: int, fraction: float) -> int:
    """How many of `size` values top-k keeps: the fraction rounded up, at least one."""
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


def topk_index_dtype(size: int) -> np.dtype[Any]:
    """int32 indices (4 bytes) unless the vector is too long for them."""
    return np.dtype(np.int32 if size <= INT32_MAX else np.int64)


def encode_topk(values: Vector, count: int) -> tuple[np.ndarray[Any, Any], ...]:
    """The `count` largest-magnitude entries of `values` (1-D float32): their indices in
    ascending order and their float32 values. Ties are broken by position, deterministically."""
    size = values.size
    if count >= size:
        indices = np.arange(size)
    else:
        # argpartition is O(n); only the kept indices are sorted (ascending: see decode_topk)
        indices = np.argpartition(np.abs(values), size - count)[size - count :]
        indices.sort()
    return indices.astype(topk_index_dtype(size)), values[indices].astype(np.float32)


def decode_topk(tensors: tuple[np.ndarray[Any, Any], ...], size: int, count: int) -> Vector:
    """The float32 vector of `size` values, zero but at the `count` sent indices;
    ProtocolError unless the indices are exactly `count` distinct ones inside the vector."""
    index_dtype = topk_index_dtype(size)
    if (
        len(tensors) != 2
        or tensors[0].dtype != index_dtype
        or tensors[0].shape != (count,)
        or tensors[1].dtype != np.float32
        or tensors[1].shape != (count,)
    ):
        shapes = [(t.dtype.str, t.shape) for t in tensors]
        raise ProtocolError(
            f"expected {count} {index_dtype.str} indices and {count} float32 values, got {shapes}"
        )
    indices, kept = tensors
    # strictly ascending and in bounds: no write outside the vector, no index sent twice
    if count and (indices[0] < 0 or indices[-1] >= size or not (np.diff(indices) > 0).all()):
        raise ProtocolError(f"top-k indices must be strictly ascending within [0, {size})")
    out: Vector = np.zeros(size, dtype=np.float32)
    out[indices] = kept
    return out
