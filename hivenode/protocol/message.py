"""The stream message: a length-prefixed msgpack header followed by raw tensor bytes.

Layout: a 4-byte big-endian header length, the header (a msgpack map), then the bytes of each
tensor in order, C-contiguous and little-endian. Receivers build arrays with `np.frombuffer`
over the received buffer, so nothing is copied; every size the peer declares is checked
against `Limits` before anything sized by it is allocated.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgpack
import numpy as np

from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.ids import WIRE_VERSION
from hivenode.protocol.limits import DEFAULT_LIMITS, Limits

HEADER_PREFIX: Final = struct.Struct(">I")
HEADER_PREFIX_BYTES: Final = HEADER_PREFIX.size

MAX_DIMS: Final = 32
"""numpy 1.x supports at most 32 dimensions; more is refused so both numpy lines can read it."""

ALLOWED_DTYPES: Final[Mapping[str, np.dtype[Any]]] = {
    np.dtype(kind).str: np.dtype(kind)
    for kind in (
        np.bool_,
        np.int8, np.int16, np.int32, np.int64,
        np.uint8, np.uint16, np.uint32, np.uint64,
        np.float16, np.float32, np.float64,
    )
}  # fmt: skip
"""Wire dtype strings (little-endian, as `np.dtype.str` spells them) a peer may send."""

_KIND_NAMES: Final[Mapping[type, str]] = {
    int: "an integer",
    str: "a string",
    dict: "a map",
    list: "a list",
}

_T = TypeVar("_T")


@dataclass(frozen=True, eq=False)
class Message:
    """One request or response on a stream.

    `eq=False`: field-wise equality would compare numpy arrays, which has no single truth
    value; compare `body` and the tensors explicitly instead.
    """

    type: str
    request_id: int
    sender: str
    body: Mapping[str, Any]
    tensors: tuple[np.ndarray[Any, Any], ...] = ()
    version: int = WIRE_VERSION


@dataclass(frozen=True)
class TensorSpec:
    """What the header says about one tensor: its dtype, shape and byte length."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, array: np.ndarray[Any, Any]) -> TensorSpec:
        return cls(array.dtype, tuple(array.shape), array.nbytes)

    def to_wire(self) -> dict[str, Any]:
        return {"dtype": self.dtype.str, "shape": list(self.shape), "nbytes": self.nbytes}

    @classmethod
    def from_wire(cls, raw: Any, index: int, limits: Limits) -> TensorSpec:
        where = f"tensor {index}"
        if not isinstance(raw, dict):
            raise ProtocolError(f"{where} must be a map, got {type(raw).__name__}")
        dtype = _allowed_dtype(_field(raw, "dtype", str, where), where)
        shape = _shape(_field(raw, "shape", list, where), dtype, where, limits)
        nbytes = _field(raw, "nbytes", int, where)
        needed = math.prod(shape) * dtype.itemsize
        if nbytes != needed:
            raise ProtocolError(
                f"{where} declares {nbytes} bytes but shape {list(shape)} of {dtype.str} "
                f"needs {needed}"
            )
        return cls(dtype, shape, nbytes)


@dataclass(frozen=True)
class Header:
    """A validated header: everything of a message except its tensor bytes."""

    version: int
    type: str
    request_id: int
    sender: str
    body: Mapping[str, Any]
    tensors: tuple[TensorSpec, ...] = ()

    @property
    def tensor_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)

    def to_message(self, tensors: tuple[np.ndarray[Any, Any], ...]) -> Message:
        return Message(self.type, self.request_id, self.sender, self.body, tensors, self.version)


def encode_message(msg: Message) -> list[bytes | memoryview]:
    """The wire parts of `msg`: prefix and header as one bytes, then one view per tensor.

    The views are over the arrays' own memory when they are already C-contiguous and
    little-endian; only other arrays are copied into that form.
    """
    arrays = [_wire_array(array, index) for index, array in enumerate(msg.tensors)]
    header = _pack(
        {
            "v": msg.version,
            "t": msg.type,
            "id": msg.request_id,
            "from": msg.sender,
            "body": dict(msg.body),
            "tensors": [TensorSpec.of(array).to_wire() for array in arrays],
        }
    )
    if len(header) > 0xFFFF_FFFF:
        raise ProtocolError(f"header of {len(header)} bytes does not fit the 4-byte length prefix")
    return [HEADER_PREFIX.pack(len(header)) + header, *(_byte_view(a) for a in arrays)]


def decode_message(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> Message:
    """Parse one complete message; its arrays are views over `data`, not copies."""
    view = memoryview(data).cast("B")
    header_end = HEADER_PREFIX_BYTES + header_length(view[:HEADER_PREFIX_BYTES], limits)
    if len(view) < header_end:
        raise ProtocolError(
            f"message of {len(view)} bytes ends inside its header, which ends at byte {header_end}"
        )
    header = parse_header(view[HEADER_PREFIX_BYTES:header_end], limits)
    expected = header_end + header.tensor_bytes
    if len(view) != expected:
        raise ProtocolError(f"message is {len(view)} bytes but its header declares {expected}")
    return header.to_message(build_tensors(header.tensors, view[header_end:]))


def header_length(prefix: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> int:
    """The header length the 4-byte prefix declares, refused if over `limits`."""
    if len(prefix) < HEADER_PREFIX_BYTES:
        raise ProtocolError(
            f"message of {len(prefix)} bytes is shorter than its "
            f"{HEADER_PREFIX_BYTES}-byte length prefix"
        )
    (length,) = HEADER_PREFIX.unpack_from(prefix)
    if length > limits.max_header_bytes:
        raise ProtocolError(
            f"header of {length} bytes exceeds the limit of {limits.max_header_bytes}"
        )
    return int(length)


def parse_header(data: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Decode and validate a header, including its tensor totals against `limits`."""
    raw = _unpack(data)
    if not isinstance(raw, dict):
        raise ProtocolError(f"header must be a map, got {type(raw).__name__}")
    version = _field(raw, "v", int)
    if version != WIRE_VERSION:
        raise ProtocolError(f"unsupported wire version {version} (this node speaks {WIRE_VERSION})")
    header = Header(
        version=version,
        type=_field(raw, "t", str),
        request_id=_field(raw, "id", int),
        sender=_field(raw, "from", str),
        body=_body(_field(raw, "body", dict)),
        tensors=_tensor_specs(_field(raw, "tensors", list), limits),
    )
    if header.tensor_bytes > limits.max_total_bytes:
        raise ProtocolError(
            f"tensors total {header.tensor_bytes} bytes, over the limit of {limits.max_total_bytes}"
        )
    return header


def build_tensors(
    specs: Iterable[TensorSpec], payload: bytes | bytearray | memoryview
) -> tuple[np.ndarray[Any, Any], ...]:
    """Arrays over consecutive slices of `payload`; the caller has checked its length."""
    view = memoryview(payload)
    arrays = []
    offset = 0
    for spec in specs:
        chunk = view[offset : offset + spec.nbytes]
        arrays.append(np.frombuffer(chunk, dtype=spec.dtype).reshape(spec.shape))
        offset += spec.nbytes
    return tuple(arrays)


def _wire_array(array: np.ndarray[Any, Any], index: int) -> np.ndarray[Any, Any]:
    """`array` as C-contiguous little-endian, copied only when it is not that already."""
    wire_dtype = array.dtype.newbyteorder("<")
    if wire_dtype.str not in ALLOWED_DTYPES:
        raise ProtocolError(
            f"tensor {index} has dtype {array.dtype.str}, which the wire does not carry "
            f"(allowed: {', '.join(ALLOWED_DTYPES)})"
        )
    if array.dtype != wire_dtype:
        array = array.astype(wire_dtype)
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    return array


def _byte_view(array: np.ndarray[Any, Any]) -> memoryview:
    """A flat byte view of a C-contiguous array's own memory."""
    return array.reshape(-1).view(np.uint8).data


def _pack(header: dict[str, Any]) -> bytes:
    try:
        packed: bytes = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"message header cannot be encoded: {exc}") from exc
    return packed


def _unpack(data: bytes | memoryview) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for garbage
        detail = f"{type(exc).__name__} {exc}".rstrip()
        raise ProtocolError(f"undecodable message header: {detail}") from exc


def _field(raw: Mapping[Any, Any], name: str, kind: type[_T], where: str = "header") -> _T:
    """`raw[name]`, refused when missing or not of `kind` (a bool is not an integer)."""
    if name not in raw:
        raise ProtocolError(f"{where} has no {name!r} field")
    value = raw[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(
            f"{where} field {name!r} must be {_KIND_NAMES[kind]}, got {type(value).__name__}"
        )
    return value


def _body(raw: dict[Any, Any]) -> dict[str, Any]:
    for key in raw:
        if not isinstance(key, str):
            raise ProtocolError(f"body keys must be strings, got {type(key).__name__}")
    return raw


def _tensor_specs(raw: list[Any], limits: Limits) -> tuple[TensorSpec, ...]:
    if len(raw) > limits.max_tensors:
        raise ProtocolError(
            f"message carries {len(raw)} tensors, over the limit of {limits.max_tensors}"
        )
    return tuple(TensorSpec.from_wire(item, index, limits) for index, item in enumerate(raw))


def _allowed_dtype(name: str, where: str) -> np.dtype[Any]:
    try:
        return ALLOWED_DTYPES[name]
    except KeyError:
        raise ProtocolError(
            f"{where} has dtype {name[:40]!r}, which is not allowed "
            f"(allowed: {', '.join(ALLOWED_DTYPES)})"
        ) from None


def _shape(raw: list[Any], dtype: np.dtype[Any], where: str, limits: Limits) -> tuple[int, ...]:
    """A shape of at most MAX_DIMS non-negative sizes whose size fits `limits`.

    Zero dimensions are left out of the size: [0, 10**30] holds no bytes, yet numpy refuses it.
    """
    if len(raw) > MAX_DIMS:
        raise ProtocolError(f"{where} has {len(raw)} dimensions, more than {MAX_DIMS}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in raw):
        raise ProtocolError(f"{where} shape must be non-negative integers, got {raw!r:.80}")
    size = math.prod(n for n in raw if n) * dtype.itemsize
    if size > limits.max_total_bytes:
        raise ProtocolError(
            f"{where} shape {raw!r:.80} would need {size} bytes, over the limit of "
            f"{limits.max_total_bytes}"
        )
    return tuple(raw)
