"""A minimal protobuf wire-format reader: walks the fields of ONNX and SavedModel files
without their generated classes, over a memory map, copying nothing it does not need."""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from hivenode.models.errors import ModelError

VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
FIXED32 = 5


class Field(NamedTuple):
    number: int
    wire_type: int
    value: int | memoryview
    """An int for varint and fixed fields, a view of the bytes for length-delimited ones."""


@contextmanager
def mapped(path: Path) -> Iterator[memoryview]:
    """The file's bytes, memory-mapped: protobuf fields are parsed without reading the
    weights they skip over."""
    with path.open("rb") as handle:
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(data)
        try:
            yield view
        finally:
            try:
                view.release()
                data.close()
            except BufferError:
                # an exception's traceback still holds slices of the map (its frames'
                # locals): the map is unmapped when they are collected, not now
                pass


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise ModelError("protobuf ends inside a varint (truncated file?)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ModelError("protobuf varint longer than 10 bytes (not a protobuf file)")


def iter_fields(buf: memoryview) -> Iterator[Field]:
    """Every top-level field of one message, in file order; ModelError on malformed bytes."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ModelError("protobuf field number 0 (not a protobuf file)")
        if wire_type == VARINT:
            value, pos = read_varint(buf, pos)
            yield Field(number, wire_type, value)
        elif wire_type == FIXED64:
            if pos + 8 > end:
                raise ModelError("protobuf ends inside a fixed64 field (truncated file?)")
            yield Field(number, wire_type, int.from_bytes(buf[pos : pos + 8], "little"))
            pos += 8
        elif wire_type == FIXED32:
            if pos + 4 > end:
                raise ModelError("protobuf ends inside a fixed32 field (truncated file?)")
            yield Field(number, wire_type, int.from_bytes(buf[pos : pos + 4], "little"))
            pos += 4
        elif wire_type == LENGTH_DELIMITED:
            length, pos = read_varint(buf, pos)
            if pos + length > end:
                raise ModelError(
                    f"protobuf field {number} claims {length} bytes, only {end - pos} remain "
                    "(truncated file?)"
                )
            yield Field(number, wire_type, buf[pos : pos + length])
            pos += length
        else:
            raise ModelError(f"protobuf wire type {wire_type} is not valid (not a protobuf file)")


def as_bytes(value: int | memoryview) -> memoryview:
    if isinstance(value, int):
        raise ModelError("protobuf field has a number where a message or string was expected")
    return value


def as_int(value: int | memoryview) -> int:
    if not isinstance(value, int):
        raise ModelError("protobuf field has bytes where a number was expected")
    return value


def as_str(value: int | memoryview) -> str:
    return bytes(as_bytes(value)).decode("utf-8", errors="replace")


def signed64(value: int) -> int:
    """A varint read as int64 (negative numbers are ten-byte two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def packed_varints(value: int | memoryview) -> list[int]:
    """A repeated integer field: one varint, or a packed run of them."""
    if isinstance(value, int):
        return [signed64(value)]
    out: list[int] = []
    pos = 0
    while pos < len(value):
        number, pos = read_varint(value, pos)
        out.append(signed64(number))
    return out
